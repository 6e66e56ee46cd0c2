"""The `atlas` command line."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from atlas_client.cli import register as register_client_commands
from rich.console import Console

from atlas.training.cli import fail
from atlas.training.cli import register as register_training_commands

if TYPE_CHECKING:
    from .settings import ServerSettings

app = typer.Typer(help="ATLAS: streaming long-context inference for recurrent ATLAS models.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
register_client_commands(app)  # ingest, ask, sessions, fork: HTTP clients of a running server


@app.callback()
def main() -> None:
    """ATLAS: streaming long-context inference for recurrent ATLAS models."""


@app.command()
def demo(
    task: Annotated[str, typer.Option(help=(
        "What to hide in the document: passkey_prose, multi_needle_prose (four named numbers), "
        "babi_single (where is Mary?), babi_two (where is the apple?), babi_count, or passkey and "
        "multi_needle in synthetic filler"))] = "passkey_prose",
    tokens: Annotated[int, typer.Option(min=1, help=(
        "Bytes of the built document (a byte-level model's tokens); with --text, tokens read "
        "(a shorter text is repeated to that length)"))] = 8192,
    seed: Annotated[int, typer.Option(help="Which document: the facts, their places and the prose")] = 0,
    prose: Annotated[Path | None, typer.Option(exists=True, help=(
        "Prose to hide the facts in: a text file or a corpus folder (atlas corpus build: its "
        "eval-prose.txt); default a built-in passage"))] = None,
    text: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help=(
        "Your own document instead: streamed in, then continued after --question"))] = None,
    question: Annotated[str, typer.Option(help=(
        "With --text: the prompt to continue (\\n and \\t read as a newline and a tab)"))] = "\n",
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: bundled)")] = None,
    baseline: Annotated[Path | None, typer.Option(help=(
        "Checkpoint whose answers go beside the model's (default: the bundled attention-only "
        "baseline, when the model is the bundled one)"))] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Ask only the model")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_tokens: Annotated[int, typer.Option(min=0, help="With --text: tokens to generate")] = 64,
) -> None:
    """Hide facts in a long document of prose, stream it into a session, and ask for each fact:
    the model's answers beside the truth and the attention-only baseline's."""
    from atlas.engine import SamplingParams

    atlas = _load(checkpoint, device)
    cfg = atlas.config
    err.print(f"model {atlas.fingerprint[:12]}  {cfg.n_layers} layers x {cfg.mixers[0]}, "
              f"d_model {cfg.d_model}, chunk {cfg.chunk_size}, device {atlas.device}")
    if text is not None:
        doc = text.read_text(encoding="utf-8", errors="replace")
        if not doc:
            err.print(f"[red]--text {text} is empty[/red]")
            raise typer.Exit(2)
        state = _demo_read(atlas, doc, tokens, "document")
        prompt = _ESCAPES.sub(lambda m: _ESCAPED[m.group(1)], question)
        gen = atlas.generate(state, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=0))
        typer.echo(prompt, nl=False)
        for tok in gen:
            typer.echo(tok.text, nl=False)
        typer.echo()
        return
    _demo_facts(atlas, task, tokens, seed, prose,
                None if no_baseline else _demo_baseline(baseline, checkpoint), device)


#: --question's escapes: a shell passes "\n" as two characters. Nothing else is touched (not
#: unicode_escape, which garbles any non-ASCII text and fails on "C:\Users").
_ESCAPES = re.compile(r"\\([nt\\])")
_ESCAPED = {"n": "\n", "t": "\t", "\\": "\\"}


def _load(checkpoint: Path | None, device: str) -> Any:
    """Atlas.load, or the one-line reason it cannot (exit 2), as `atlas serve` says it."""
    from atlas.engine import Atlas
    from atlas.engine.checkpoint import CheckpointError

    try:
        return Atlas.load(checkpoint, device=device)
    except (CheckpointError, ValueError) as e:
        fail(str(e))


def _demo_read(atlas: Any, doc: str, tokens: int | None, label: str) -> Any:
    """A session after `doc` (its first `tokens` tokens, repeated to that length if shorter; all of it
    if None), with a progress bar, saved and restored to show the state's fixed size."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    ids = atlas.encode(doc)
    if tokens is not None:
        while len(ids) < tokens:
            ids = ids + ids
        ids = ids[:tokens]
    state = atlas.new_state()
    piece = 16 * atlas.config.chunk_size
    start = time.perf_counter()
    with Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[rate]}"), console=err) as bar:
        job = bar.add_task(label, total=len(ids), rate="")
        for i in range(0, len(ids), piece):
            state, _ = atlas.feed(state, ids[i:i + piece])
            rate = min(len(ids), i + piece) / (time.perf_counter() - start)
            bar.update(job, completed=min(len(ids), i + piece), rate=f"{rate:,.0f} tok/s")
    elapsed = time.perf_counter() - start
    data = atlas.save_state(state)
    restored = atlas.load_state(data)
    err.print(f"{label}: read {len(ids):,} tokens in {elapsed:.1f}s ({len(ids) / elapsed:,.0f} tok/s); "
              f"state {len(data):,} bytes (the same for any length); "
              f"restored bit-exact: {restored.equal(state)}")
    return restored


def _demo_baseline(baseline: Path | None, checkpoint: Path | None) -> Path | None:
    """The baseline to ask beside the model: --baseline, else the bundled one beside the bundled model."""
    from atlas.training.demo import BASELINE_CHECKPOINT

    if baseline is not None:
        return baseline
    bundled = checkpoint is None and (BASELINE_CHECKPOINT / "config.json").exists()
    return BASELINE_CHECKPOINT if bundled else None


def _demo_facts(atlas: Any, task: str, tokens: int, seed: int, prose: Path | None, baseline: Path | None,
                device: str) -> None:
    """Build the task's document, read it with the model (and the baseline), ask for every fact."""
    from rich.table import Table

    from atlas.training.demo import ask_all, demo_document, is_right
    from atlas.training.prompt import held_out_prose

    try:
        text = None if prose is None else held_out_prose(prose)
        doc = demo_document(task, tokens, seed, text)
    except (OSError, ValueError) as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    err.print(f"document: {len(doc.document):,} bytes of {prose or 'the built-in passage'} with "
              f"{len(doc.facts)} fact(s) of {task} hidden at random places (seed {seed})")
    answers = {"model": ask_all(atlas, _demo_read(atlas, doc.document, None, "model"), doc.facts)}
    if baseline is not None:
        other = _load(baseline, device)
        answers["baseline"] = ask_all(other, _demo_read(other, doc.document, None, "baseline"), doc.facts)
    table = Table(title=f"{task}, {len(doc.document):,} bytes")
    table.add_column("question")
    table.add_column("truth")
    for name in answers:
        table.add_column(name)
    for i, fact in enumerate(doc.facts):
        cells = [f"{a.strip()!r} {'right' if is_right(fact, a) else 'wrong'}"
                 for a in (answers[n][i] for n in answers)]
        table.add_row(fact.question.strip(), fact.truth, *cells)
    Console().print(table)
    for name, said in answers.items():
        right = sum(is_right(f, a) for f, a in zip(doc.facts, said, strict=True))
        typer.echo(f"{name}: {right}/{len(doc.facts)} right")


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

    from .app import create_app
    from .logs import setup_logging
    from .settings import is_loopback

    given = dict(host=host, port=port, device=device, dtype=dtype, log_level=log_level,
                 log_format=log_format, model=str(model) if model else None)
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # unset: ATLAS_*
    if allow_remote:
        overrides["allow_remote"] = True
    settings = _settings(overrides)
    # One handler for ours and uvicorn's loggers (uvicorn gets log_config=None below), in the chosen
    # format, with the request id on every line of a request.
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("atlas.server")
    _check_device_and_model(settings)
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


def _settings(overrides: dict[str, Any]) -> ServerSettings:
    """The server's settings, after checking every ATLAS_* setting (the engine's, the store's, the
    kernels' too): a bad one stops here, named as set, without its value (ATLAS_API_KEYS holds
    secrets)."""
    from pydantic import ValidationError

    from atlas.engine.runtime import RuntimeSettings
    from atlas.engine.store import StoreSettings
    from atlas.kernels.settings import KernelSettings

    from .settings import ServerSettings

    try:
        settings = ServerSettings(**overrides)
        RuntimeSettings()
        StoreSettings()
        KernelSettings()
    except ValidationError as e:
        for problem in e.errors(include_input=False, include_url=False):
            name = "ATLAS_" + "_".join(str(p) for p in problem["loc"]).upper()
            err.print(f"invalid setting {name}: {problem['msg']}", style="red", markup=False,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from e
    except ValueError as e:  # pydantic-settings' SettingsError: a value it cannot parse at all
        fail(f"invalid setting: {e}")
    return settings


def _check_device_and_model(settings: ServerSettings) -> None:
    """A device this torch cannot use, or a model folder that cannot load: one line, exit 2,
    before serving."""
    from atlas.engine.api import resolve_device
    from atlas.engine.checkpoint import CheckpointError, read_checkpoint

    try:
        resolve_device(settings.device)
        if settings.model:
            read_checkpoint(settings.model)
    except (CheckpointError, ValueError) as e:
        fail(str(e))


register_training_commands(app)  # train, eval (after serve, in `atlas --help` too)

if __name__ == "__main__":
    app()
