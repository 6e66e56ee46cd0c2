"""The `atlas` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from atlas_client.cli import register as register_client_commands
from rich.console import Console

app = typer.Typer(help="ATLAS: streaming long-context inference for recurrent ATLAS models.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
register_client_commands(app)  # ingest, ask, sessions, fork: HTTP clients of a running server


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
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from atlas.engine import Atlas, SamplingParams

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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (ATLAS_HOST; default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (ATLAS_PORT; default 8000)")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Checkpoint directory (ATLAS_MODEL; default: bundled)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (ATLAS_DEVICE)")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Bind a non-loopback host without API keys (ATLAS_ALLOW_REMOTE)")] = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning (ATLAS_LOG_LEVEL)")] = None,
) -> None:
    """Start the HTTP server (settings from ATLAS_* variables; options override them)."""
    import logging
    import math

    import uvicorn

    from .app import create_app
    from .settings import ServerSettings, is_loopback

    overrides = {k: v for k, v in dict(host=host, port=port, device=device, log_level=log_level,
                                       model=str(model) if model else None).items() if v is not None}
    if allow_remote:
        overrides["allow_remote"] = True
    settings = ServerSettings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    log = logging.getLogger("atlas.server")
    if settings.model and not (Path(settings.model) / "config.json").exists():
        err.print(f"[red]no checkpoint at {settings.model} (config.json missing)[/red]")
        raise typer.Exit(2)
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
                            proxy_headers=False)
    Server(config).run()


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training config (TOML or JSON): configs/train/demo.toml")],
    out_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and the loss log go")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out_dir/trainer.pt if it exists")] = True,
) -> None:
    """Train a model on the synthetic long-context tasks; checkpoints to OUT_DIR/model."""
    from pydantic import ValidationError

    from atlas.engine.training import TrainConfig, run_training

    try:
        cfg = TrainConfig.load(config)
        given = dict(out_dir=out_dir, steps=steps, device=device)
        overrides = {k: v for k, v in given.items() if v is not None}
        cfg = TrainConfig(**{**cfg.model_dump(), **overrides})
    except (OSError, ValueError, ValidationError) as e:
        err.print(f"[red]bad training config {config}: {e}[/red]")
        raise typer.Exit(2) from e
    start = time.perf_counter()
    path = run_training(cfg, resume=resume)
    err.print(f"checkpoint {path} ({time.perf_counter() - start:.0f}s this run)")


DEFAULT_LENGTHS = "1k,4k,16k,64k,256k,1M"


@app.command(name="eval")
def evaluate(
    model: Annotated[list[str] | None, typer.Option(
        help="NAME=CHECKPOINT_DIR, repeatable (default: demo=the bundled model)")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated: passkey, multi_needle (default both)")] = None,
    lengths: Annotated[str | None, typer.Option(
        help=f"Comma-separated context lengths (default {DEFAULT_LENGTHS}, and 10M on CUDA)")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Prompts per point (needles at spread depths)")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the generated prompts")] = 0,
    gap: Annotated[int, typer.Option(min=0, help=(
        "At least this many bytes between each needle and the question, e.g. the attention window "
        "to measure the memory alone"))] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(
        help="Results JSON (default bench/results/passkey-DEVICE.json)")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw accuracy against length to this PNG")] = None,
    update: Annotated[bool, typer.Option(help=(
        "Add to an existing --out file made with the same seed, gap and trials: the models evaluated "
        "now replace their entries, the others are kept"))] = False,
) -> None:
    """Accuracy against context length on pass-key and multi-needle retrieval."""
    import json

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from atlas.engine.api import BUNDLED_CHECKPOINT, resolve_device
    from atlas.engine.checkpoint import fingerprint, load_checkpoint, read_config
    from atlas.engine.evaluation import evaluate as run_eval
    from atlas.engine.evaluation import parse_length
    from atlas.engine.evaluation import plot as draw
    from atlas.engine.machine import describe_machine
    from atlas.engine.tasks import TASKS

    dev = resolve_device(device)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(TASKS)
    if bad := [t for t in task_list if t not in TASKS]:
        err.print(f"[red]unknown task(s) {bad}; choose from {list(TASKS)}[/red]")
        raise typer.Exit(2)
    try:
        length_list = [parse_length(x) for x in (lengths or DEFAULT_LENGTHS).split(",") if x.strip()]
    except ValueError as e:
        err.print(f"[red]bad --lengths: {e}[/red]")
        raise typer.Exit(2) from e
    if lengths is None and dev.type == "cuda":
        length_list.append(10 * (1 << 20))
    specs = model or [f"demo={BUNDLED_CHECKPOINT}"]
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "config.json").exists():
            err.print(f"[red]--model wants NAME=CHECKPOINT_DIR with a config.json, got {spec!r}[/red]")
            raise typer.Exit(2)
        models[name] = Path(path)
    out = out or Path("bench/results") / f"passkey-{dev.type}.json"
    machine = describe_machine(dev)
    results: dict = {"benchmark": "passkey", "machine": machine, "seed": seed, "gap": gap,
                     "trials": trials, "lengths": length_list, "tasks": task_list, "models": {}}
    if update and out.exists():
        try:
            earlier = json.loads(out.read_text())
            differ = [k for k in ("seed", "gap", "trials") if earlier[k] != results[k]]
        except (ValueError, KeyError, TypeError) as e:
            err.print(f"[red]--update: {out} is not an eval results file ({e})[/red]")
            raise typer.Exit(2) from e
        if differ:
            err.print(f"[red]--update: {out} was made with other {', '.join(differ)} "
                      f"({', '.join(f'{k}={earlier[k]}' for k in differ)})[/red]")
            raise typer.Exit(2)
        results["lengths"] = sorted(set(earlier["lengths"]) | set(length_list))
        results["tasks"] = [t for t in TASKS if t in set(earlier["tasks"]) | set(task_list)]
        for name, entry in earlier["models"].items():
            results["models"][name] = {"machine": earlier["machine"], **entry}
        for key in ("max_train_len", "swa_window"):
            if key in earlier:
                results[key] = earlier[key]
    total = sum(trials * n for n in length_list) * len(task_list) * len(models)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=err) as bar:
        job = bar.add_task("eval", total=total)
        for name, path in models.items():
            net = load_checkpoint(path, device=dev)
            _, meta = read_config(path)
            entry = {"path": str(path), "machine": machine, "fingerprint": fingerprint(net),
                     "config": net.cfg.model_dump(mode="json"),
                     "parameters": sum(p.numel() for p in net.parameters()),
                     "training": meta.get("training"), "points": []}
            results["models"][name] = entry
            results.setdefault("max_train_len", (meta.get("training") or {}).get("max_train_len", 8192))
            if set(net.cfg.mixers) & {"swa", "mag"}:
                results.setdefault("swa_window", net.cfg.swa_window)

            def report(p, name=name, entry=entry) -> None:
                entry["points"].append(p.to_dict())
                err.print(f"{name:>14} {p.task:>12} {p.length:>9,} tokens: {p.correct}/{p.trials} "
                          f"({100 * p.accuracy:.0f}%; value first {p.prefix_correct}), "
                          f"value {p.value_nats:.2f} vs decoy {p.decoy_nats:.2f} "
                          f"nats/byte (first byte {p.value_nats_by_byte[0]:.2f} vs "
                          f"{p.decoy_nats_by_byte[0]:.2f}; its end {p.end_nats:.2f})  "
                          f"{p.tokens_per_s:,.0f} tok/s")

            bar.update(job, description=name)
            run_eval(net, task_list, length_list, trials, seed, on_point=report,
                     on_progress=lambda n: bar.advance(job, n), gap=gap)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    err.print(f"results {out}")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        draw(results, str(plot))
        err.print(f"plot {plot}")


def _builtin_text() -> str:
    return ("ATLAS keeps a small neural memory that it trains while it reads, one optimiser step per "
            "chunk of sixty-four tokens, so a long document costs no more memory than a short one.\n") * 64


if __name__ == "__main__":
    app()
