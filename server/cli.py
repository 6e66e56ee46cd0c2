"""The `atlas` command line."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from atlas_client.cli import register as register_client_commands
from rich.console import Console

from atlas.training.cli import register as register_training_commands

app = typer.Typer(help="ATLAS: streaming long-context inference for recurrent ATLAS models.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
register_client_commands(app)  # ingest, ask, sessions, fork: HTTP clients of a running server


@app.callback()
def main() -> None:
    """ATLAS: streaming long-context inference for recurrent ATLAS models."""


@app.command()
def demo(
    text: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help=(
        "Document to stream in (default: a built-in one of TOKENS bytes with a pass key hidden "
        "half-way)"))] = None,
    tokens: Annotated[int, typer.Option(help="Tokens of the document to read")] = 8192,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: bundled)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    question: Annotated[str | None, typer.Option(help=(
        "Prompt to continue after the document (default: the pass-key question after the built-in "
        "document, a new line after --text)"))] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate")] = 64,
) -> None:
    """Stream a document into a session, save and restore its state, and continue it."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from atlas.engine import Atlas, SamplingParams

    doc, question = _demo_document(text, tokens, question)
    atlas = Atlas.load(checkpoint, device=device)
    cfg = atlas.config
    err.print(f"model {atlas.fingerprint[:12]}  {cfg.n_layers} layers x {cfg.mixers[0]}, "
              f"d_model {cfg.d_model}, chunk {cfg.chunk_size}, device {atlas.device}")
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


def _demo_document(text: Path | None, tokens: int, question: str | None) -> tuple[str, str]:
    """The document `atlas demo` reads and the prompt it continues: --text, or a built-in pass-key
    document (the bundled model's task: its answer comes from the memory, thousands of tokens on)."""
    if text is not None:
        doc = text.read_text(encoding="utf-8", errors="replace")
        if not doc:
            err.print(f"[red]--text {text} is empty[/red]")
            raise typer.Exit(2)
        return doc, "\n" if question is None else question
    from atlas.training.tasks import PASSKEY_QUESTION, min_length, passkey

    shortest = min_length("passkey") - len(PASSKEY_QUESTION)
    if tokens < shortest:
        err.print(f"[red]--tokens must be at least {shortest} for the built-in document[/red]")
        raise typer.Exit(2)
    # The question goes after the document, which is then `tokens` bytes (byte tokens) long.
    sample = passkey(random.Random(0), tokens + len(PASSKEY_QUESTION), depth=0.5)
    err.print(f"built-in document: {tokens:,} bytes of filler with the pass key {sample.value} "
              "hidden half-way")
    return sample.prompt.removesuffix(PASSKEY_QUESTION), PASSKEY_QUESTION if question is None else question


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (ATLAS_HOST; default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (ATLAS_PORT; default 8000)")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Checkpoint directory (ATLAS_MODEL; default: bundled)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (ATLAS_DEVICE)")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Weights' dtype: float32, bfloat16 or float16 (ATLAS_DTYPE; default float32); "
             "the session state stays fp32")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Bind a non-loopback host without API keys (ATLAS_ALLOW_REMOTE)")] = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning (ATLAS_LOG_LEVEL)")] = None,
    log_format: Annotated[str | None, typer.Option(
        help="text, or json: one object per line with time, level, logger, message, request_id "
             "(ATLAS_LOG_FORMAT)")] = None,
) -> None:
    """Start the HTTP server (settings from ATLAS_* variables; options override them)."""
    import logging
    import math

    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .logs import setup_logging
    from .settings import ServerSettings, is_loopback

    given = dict(host=host, port=port, device=device, dtype=dtype, log_level=log_level,
                 log_format=log_format, model=str(model) if model else None)
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # unset: ATLAS_*
    if allow_remote:
        overrides["allow_remote"] = True
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        err.print(f"[red]invalid setting: {e}[/red]")
        raise typer.Exit(2) from e
    # One handler for ours and uvicorn's loggers (uvicorn gets log_config=None below), in the chosen
    # format, with the request id on every line of a request.
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("atlas.server")
    if settings.model:  # a folder that cannot load: its one-line reason and exit 2, before serving
        from atlas.engine.checkpoint import CheckpointError, read_checkpoint

        try:
            read_checkpoint(settings.model)
        except CheckpointError as e:
            err.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from e
    if not settings.auth_enabled and not settings.allow_remote and not is_loopback(settings.host):
        log.warning("no API keys configured: binding 127.0.0.1 instead of %s "
                    "(set ATLAS_API_KEYS, or pass --allow-remote)", settings.host)
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    api = create_app(settings)

    class Server(uvicorn.Server):
        """On SIGTERM/SIGINT, new requests get 503 at once while running ones drain."""

        def handle_exit(self, sig: int, frame: object) -> None:
            api.state.draining = True
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(api, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
                            proxy_headers=False, log_config=None)
    Server(config).run()


register_training_commands(app)  # train, eval (after serve, in `atlas --help` too)

if __name__ == "__main__":
    app()
