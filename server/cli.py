"""The `atlas` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="ATLAS: streaming long-context inference for recurrent ATLAS models.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)



@app.callback()
def main() -> None:
    """ATLAS: streaming long-context inference for recurrent ATLAS models."""


DEFAULT_DEMO_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@app.command()
def demo(
    text: Annotated[Path | None, typer.Option(help="Document to stream in (default: built-in text)")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens of the document to read")] = 8192,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: bundled)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    question: Annotated[str, typer.Option(help="Prompt to continue after the document")] = "\nROMEO:",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate")] = 64,
) -> None:
    """Stream a document into a session, save and restore its state, and continue it."""
    from atlas.engine import Atlas, SamplingParams
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    atlas = Atlas.load(checkpoint, device=device)
    cfg = atlas.config
    err.print(f"model {atlas.fingerprint[:12]}  {cfg.n_layers} layers x {cfg.mixers[0]}, "
              f"d_model {cfg.d_model}, chunk {cfg.chunk_size}, device {atlas.device}")
    path = text or (DEFAULT_DEMO_TEXT if DEFAULT_DEMO_TEXT.exists() else None)
    doc = path.read_text(encoding="utf-8", errors="replace") if path else _builtin_text()
    ids = atlas.encode(doc)
    while len(ids) < tokens:
        ids = ids + ids
    ids = ids[:tokens]
    state = atlas.new_state()
    piece = 16 * cfg.chunk_size
    start = time.perf_counter()
    with Progress(TextColumn("ingest"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[rate]}"), console=err) as bar:
        task = bar.add_task("ingest", total=len(ids), rate="")
        for i in range(0, len(ids), piece):
            state, _ = atlas.feed(state, ids[i:i + piece])
            rate = (i + piece) / (time.perf_counter() - start)
            bar.update(task, completed=min(len(ids), i + piece), rate=f"{rate:,.0f} tok/s")
    elapsed = time.perf_counter() - start
    data = atlas.save_state(state)
    restored = atlas.load_state(data)
    err.print(f"read {len(ids):,} tokens in {elapsed:.1f}s ({len(ids) / elapsed:,.0f} tok/s); "
              f"state {len(data):,} bytes (the same for any length); "
              f"restored bit-exact: {restored.equal(state)}")
    gen = atlas.generate(restored, question, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=0))
    typer.echo(question, nl=False)
    for tok in gen:
        typer.echo(tok.text, nl=False)
    typer.echo()


def _builtin_text() -> str:
    return ("ATLAS keeps a small neural memory that it trains while it reads, one optimiser step per "
            "chunk of sixty-four tokens, so a long document costs no more memory than a short one.\n") * 64


if __name__ == "__main__":
    app()
