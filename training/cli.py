"""`atlas train`, `atlas eval`, `atlas init`, `atlas convert` and `atlas corpus build`: the commands
`atlas` mounts with ``register(app)``.

Heavy modules (torch, the trainer) load inside the commands, so that `atlas --help` and the serving
commands start without them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    import torch
    from rich.progress import Progress, TaskID

    from .evaluation import Point

err = Console(stderr=True)

DEFAULT_LENGTHS = "1k,4k,16k,64k,256k,1M"


DTYPES = ("float32", "bfloat16", "float16")


def register(app: typer.Typer) -> None:
    """Add `train`, `eval`, `init`, `convert`, `tokenizer train` and `corpus build` to a typer app
    (the `atlas` command line uses this)."""
    app.command()(train)
    app.command(name="eval")(evaluate)
    app.command(name="init")(init_model)
    app.command()(convert)
    tokenizer = typer.Typer(help="Tokenizers for new models.", no_args_is_help=True)
    tokenizer.command(name="train")(train_tokenizer)
    app.add_typer(tokenizer, name="tokenizer")
    corpus = typer.Typer(help="Corpora of real text from what the machine carries.", no_args_is_help=True)
    corpus.command(name="build")(build_corpus)
    app.add_typer(corpus, name="corpus")


def build_corpus(
    out: Annotated[Path, typer.Option(help="The folder to write the corpus and manifest.json into")],
    seed: Annotated[int, typer.Option(help="Salt of the hash that picks the held-out pieces")] = 0,
    texts: Annotated[Path | None, typer.Option(help=(
        "A folder of your own texts (*.txt, *.md) to add to the prose"))] = None,
) -> None:
    """Gather prose and code (your texts, the standard library, installed packages' docs and
    licences) into train-*.txt and held-out eval-*.txt (training/corpus.py has the rules)."""
    from .corpus import build_corpus as build
    from .corpus import default_roots, summary

    start = time.perf_counter()
    try:
        manifest = build(out, seed, default_roots(texts))
    except OSError as e:
        fail(f"atlas corpus build: {e}")
    for line in summary(manifest):
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    err.print(f"corpus {out} ({manifest['duplicates_dropped']} duplicates dropped, "
              f"{time.perf_counter() - start:.0f}s); the real-text tasks read it with "
              f"atlas eval --tasks passkey_prose,babi_single --prose {out}",
              markup=False, highlight=False, soft_wrap=True)


def train_tokenizer(
    files: Annotated[list[str], typer.Argument(help="Text files (txt, jsonl, parquet) or glob patterns")],
    out: Annotated[Path, typer.Option(help=(
        "The tokenizer.json to write (tokenizer_config.json goes beside it)"))],
    vocab: Annotated[int, typer.Option(min=2, help="Tokens in all, special tokens included")] = 8192,
    min_frequency: Annotated[int, typer.Option(min=1, help="Merge only pairs seen this often")] = 2,
    text_field: Annotated[str, typer.Option(help="The field of jsonl records / parquet column")] = "text",
) -> None:
    """Learn a byte-level BPE tokenizer from text files (for atlas init --tokenizer)."""
    from tokenizers import Tokenizer

    from .tokenizer_trainer import train_tokenizer as learn

    start = time.perf_counter()
    try:
        path = learn(files, vocab, out, min_frequency=min_frequency, text_field=text_field)
    except (OSError, ValueError, ImportError) as e:
        fail(str(e))
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    err.print(f"tokenizer {path}: {size} tokens ({time.perf_counter() - start:.0f}s); next: "
              f"atlas init --config MODEL.json --tokenizer {path} --out MODEL_DIR",
              markup=False, highlight=False, soft_wrap=True)


def init_model(
    config: Annotated[Path, typer.Option(help=(
        "Model config in the config.json format, e.g. configs/models/atlas-170m.json"))],
    out: Annotated[Path, typer.Option(help="The checkpoint folder to write (must not hold a config.json)")],
    tokenizer: Annotated[Path | None, typer.Option(help=(
        "A tokenizer.json (Hugging Face tokenizers) to copy in; default: the byte tokenizer"))] = None,
    tokenizer_config: Annotated[Path | None, typer.Option(help=(
        "A tokenizer_config.json to copy in (default: the one beside --tokenizer, if any)"))] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
    dtype: Annotated[str, typer.Option(help="Weights' dtype: float32, bfloat16 or float16")] = "float32",
) -> None:
    """Write a randomly initialised checkpoint folder (serve it with ATLAS_MODEL=OUT atlas serve)."""
    import torch

    from atlas.engine.checkpoint import CheckpointError, count_parameters
    from atlas.training.authoring import init_checkpoint

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        ckpt = init_checkpoint(config, out, tokenizer, tokenizer_config, seed=seed,
                               dtype=getattr(torch, dtype))
    except (CheckpointError, OSError, ValueError) as e:
        fail(str(e))
    params = count_parameters(ckpt.config)
    eos = ckpt.eos_token_ids
    err.print(f"checkpoint {out}: {params:,} parameters in {dtype}, vocabulary {ckpt.config.vocab_size}, "
              + (f"end of sequence id {eos[0]}" if eos else
                 "no end-of-sequence token (generation stops at max_tokens or a stop string)"),
              markup=False, highlight=False, soft_wrap=True)
    err.print(f"serve it: ATLAS_MODEL={out} atlas serve", markup=False, highlight=False, soft_wrap=True)


def convert(
    old: Annotated[Path, typer.Argument(help="Checkpoint folder to convert (any layout this version reads)")],
    new: Annotated[Path, typer.Argument(help="The folder to write (must not hold a config.json)")],
    dtype: Annotated[str | None, typer.Option(help=(
        "Cast the weights: float32, bfloat16 or float16 (default: keep them bit for bit)"))] = None,
    max_shard_bytes: Annotated[int | None, typer.Option(min=1, help=(
        "Largest weight file; bigger weights go into shards (default 5e9)"))] = None,
) -> None:
    """Write a checkpoint folder in the current format (docs/formats.md), e.g. an old one's."""
    import torch

    from atlas.engine.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointError
    from atlas.training.authoring import convert_checkpoint

    if dtype is not None and dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        ckpt = convert_checkpoint(old, new, dtype=getattr(torch, dtype) if dtype else None,
                                  max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    except (CheckpointError, OSError, ValueError) as e:
        fail(str(e))
    err.print(f"checkpoint {new}: fingerprint {ckpt.fingerprint}", markup=False, highlight=False,
              soft_wrap=True)


def fail(message: str) -> NoReturn:
    """One line on stderr (never wrapped, never read as markup) and exit status 2."""
    err.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def train(
    config: Annotated[Path, typer.Argument(help="Training config (TOML or JSON): configs/train/demo.toml")],
    out_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and the loss log go")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue from OUT_DIR/model/training_state/trainer.pt if it exists")] = True,
) -> None:
    """Train a model on the synthetic long-context tasks or on text files (the config's corpus
    table); checkpoints to OUT_DIR/model. Under torchrun (python -m atlas.training) every process
    runs this."""
    from pydantic import ValidationError

    from .config import TrainConfig
    from .distributed import World
    from .trainer import run_training

    try:
        cfg = TrainConfig.load(config)
        given = dict(out_dir=out_dir, steps=steps, device=device)
        overrides = {k: v for k, v in given.items() if v is not None}
        cfg = TrainConfig(**{**cfg.model_dump(), **overrides})
    except (OSError, ValueError, ValidationError) as e:
        err.print(f"[red]bad training config {config}: {e}[/red]")
        raise typer.Exit(2) from e
    start = time.perf_counter()
    try:
        path = run_training(cfg, resume=resume)
    except (OSError, ValueError, ImportError) as e:  # missing files, a corpus that does not fit, ...
        fail(f"atlas train {config}: {e}")
    if World.from_env().main:
        err.print(f"checkpoint {path} ({time.perf_counter() - start:.0f}s this run)")


def evaluate(
    model: Annotated[list[str] | None, typer.Option(
        help="NAME=CHECKPOINT_DIR, repeatable (default: demo=the bundled model)")] = None,
    tasks: Annotated[str | None, typer.Option(
        help=("Comma-separated: passkey, multi_needle (default both); in real prose: passkey_prose, "
              "multi_needle_prose, babi_single, babi_two, babi_count; the bAbI training steps: "
              "babi_people, babi_echo, babi_moves, babi_recall, babi_where, babi_rooms"))] = None,
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
    prose: Annotated[Path | None, typer.Option(help=(
        "Held-out prose of the real-text tasks: a corpus folder (atlas corpus build) or a text file "
        "(default: a short built-in passage)"))] = None,
    update: Annotated[bool, typer.Option(help=(
        "Add to an existing --out file made with the same seed, gap and trials: the models evaluated "
        "now replace their entries, the others are kept"))] = False,
) -> None:
    """Accuracy against context length on pass-key and multi-needle retrieval."""
    from atlas.engine.api import resolve_device
    from atlas.engine.machine import describe_machine

    from .tasks import min_length

    try:
        dev = resolve_device(device)
    except ValueError as e:
        fail(str(e))
    task_list = _task_list(tasks)
    length_list = _length_list(lengths, dev)
    if not any(n >= min_length(t) + gap for t in task_list for n in length_list):
        fail(f"no task fits in --lengths {lengths}" + (f" with --gap {gap}" if gap else "")
              + ": the shortest prompts are " + ", ".join(f"{t} {min_length(t) + gap}" for t in task_list))
    for t in task_list:
        if short := [n for n in length_list if n < min_length(t) + gap]:
            err.print(f"{t}: skipping lengths {short}, under its shortest prompt "
                      f"({min_length(t) + gap} tokens)")
    models = _checkpoints(model)
    out = out or Path("bench/results") / f"passkey-{dev.type}.json"
    results: dict = {"benchmark": "passkey", "machine": describe_machine(dev), "seed": seed, "gap": gap,
                     "trials": trials, "lengths": length_list, "tasks": task_list, "models": {}}
    prose_text = _prose(prose, task_list, results)
    if update and out.exists():
        _keep_earlier_results(results, out)
    _evaluate_models(results, models, dev, task_list, length_list, prose_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    err.print(f"results {out}")
    if plot:
        from .evaluation import plot as draw

        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            draw(results, str(plot))
        except OSError as e:
            fail(f"--plot {plot}: {e} (the results are in {out})")
        err.print(f"plot {plot}")


def _prose(source: Path | None, task_list: list[str], results: dict) -> str | None:
    """--prose read (None: the tasks' built-in passage), described in results["prose"] when a
    real-text task runs: where it came from (as given, relative or the builder's folder name),
    its size and hash, so that a result names the text it was measured on."""
    import hashlib

    from .prompt import held_out_prose
    from .tasks import BABI_STEP_TASKS, PROSE_TASKS

    if not set(task_list) & {*PROSE_TASKS, *BABI_STEP_TASKS}:
        return None
    try:
        text = held_out_prose(source)
    except (OSError, ValueError) as e:
        fail(f"--prose: {e}")
    name = "built-in FALLBACK_PROSE (training/prompt.py)" if source is None else (
        source.name if source.is_absolute() else source.as_posix())
    results["prose"] = {"source": name, "bytes": len(text),
                        "sha256": hashlib.sha256(text.encode()).hexdigest()}
    if source is not None and (manifest := source / "manifest.json").is_file():  # a corpus folder
        corpus = json.loads(manifest.read_text())
        results["prose"].update(corpus_seed=corpus.get("seed"), eval_prose=corpus["files"]["eval-prose.txt"],
                                manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest())
    return None if source is None else text


def _task_list(tasks: str | None) -> list[str]:
    """--tasks as a list (default: pass-key and multi-needle); exits 2 on an unknown one."""
    from .tasks import EVAL_TASKS, TASKS

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else list(TASKS)
    if not task_list:
        fail(f"--tasks names no task; choose from {list(EVAL_TASKS)}")
    if bad := [t for t in task_list if t not in EVAL_TASKS]:
        err.print(f"[red]unknown task(s) {bad}; choose from {list(EVAL_TASKS)}[/red]")
        raise typer.Exit(2)
    return task_list


def _length_list(lengths: str | None, dev: torch.device) -> list[int]:
    """--lengths in tokens; the default adds 10M on CUDA. Exits 2 on a bad length."""
    from .evaluation import parse_length

    try:
        length_list = [parse_length(x) for x in (lengths or DEFAULT_LENGTHS).split(",") if x.strip()]
    except ValueError as e:
        err.print(f"[red]bad --lengths: {e}[/red]")
        raise typer.Exit(2) from e
    if bad := [n for n in length_list if n < 1]:
        fail(f"bad --lengths: {bad} (a length is at least 1 token)")
    if not length_list:
        fail("--lengths names no length")
    if lengths is None and dev.type == "cuda":
        length_list.append(10 * (1 << 20))
    return length_list


def _checkpoints(specs: list[str] | None) -> dict[str, Path]:
    """--model NAME=CHECKPOINT_DIR options by name (default: the bundled model as "demo"), each
    checked (one line and exit 2 for a folder that cannot load, or a model with a tokenizer.json:
    the tasks are built, and their lengths counted, in bytes)."""
    from atlas.engine.api import BUNDLED_CHECKPOINT
    from atlas.engine.checkpoint import TOKENIZER_FILE, CheckpointError, read_checkpoint

    models: dict[str, Path] = {}
    for spec in specs or [f"demo={BUNDLED_CHECKPOINT}"]:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "config.json").exists():
            err.print(f"[red]--model wants NAME=CHECKPOINT_DIR with a config.json, got {spec!r}[/red]")
            raise typer.Exit(2)
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            fail(str(e))
        if (Path(path) / TOKENIZER_FILE).exists():
            fail(f"--model {spec}: atlas eval measures byte-level models (its prompts are built and "
                  f"counted in bytes); this one reads through its {TOKENIZER_FILE}")
        models[name] = Path(path)
    return models


def _keep_earlier_results(results: dict, out: Path) -> None:
    """--update: merge the models, lengths and tasks of `out` into `results` (a model evaluated now
    replaces its entry later, keeping the points it does not measure again when its weights are the
    same). Exits 2 if `out` was made with another seed, gap or trials."""
    from .tasks import EVAL_TASKS

    try:
        earlier = json.loads(out.read_text())
        differ = [k for k in ("seed", "gap", "trials") if earlier[k] != results[k]]
        for key, kind in (("lengths", list), ("tasks", list), ("models", dict), ("machine", dict)):
            if not isinstance(earlier[key], kind):
                raise TypeError(f"{key} is not a {kind.__name__}")
    except (ValueError, KeyError, TypeError) as e:
        err.print(f"[red]--update: {out} is not an eval results file ({e})[/red]")
        raise typer.Exit(2) from e
    if differ:
        err.print(f"[red]--update: {out} was made with other {', '.join(differ)} "
                  f"({', '.join(f'{k}={earlier[k]}' for k in differ)})[/red]")
        raise typer.Exit(2)
    results["lengths"] = sorted(set(earlier["lengths"]) | set(results["lengths"]))
    results["tasks"] = [t for t in EVAL_TASKS if t in set(earlier["tasks"]) | set(results["tasks"])]
    for name, entry in earlier["models"].items():
        results["models"][name] = {"machine": earlier["machine"], **entry}
    if "prose" in earlier and results.setdefault("prose", earlier["prose"]) != earlier["prose"]:
        err.print(f"[red]--update: {out} was measured on other prose ({earlier['prose']['source']})[/red]")
        raise typer.Exit(2)
    for key in ("max_train_len", "swa_window"):
        if key in earlier:
            results[key] = earlier[key]


def _evaluate_models(results: dict, models: dict[str, Path], dev: torch.device, task_list: list[str],
                     length_list: list[int], prose: str | None = None) -> None:
    """Evaluate each checkpoint into results["models"][name], with a progress bar over all tokens."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    total = sum(results["trials"] * n for n in length_list) * len(task_list) * len(models)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=err) as bar:
        job = bar.add_task("eval", total=total)
        for name, path in models.items():
            bar.update(job, description=name)
            _evaluate_model(results, name, path, dev, task_list, length_list, bar, job, prose)


def _evaluate_model(results: dict, name: str, path: Path, dev: torch.device, task_list: list[str],
                    length_list: list[int], bar: Progress, job: TaskID, prose: str | None = None) -> None:
    from atlas.engine.checkpoint import CheckpointError, fingerprint, load_checkpoint, read_config
    from atlas.engine.machine import portable_path, with_portable_paths

    from .evaluation import evaluate as run_eval

    try:
        net = load_checkpoint(path, device=dev)
    except CheckpointError as e:  # the tensors' data (read_checkpoint checked the rest)
        bar.stop()
        fail(str(e))
    _, meta = read_config(path)
    entry = {"path": portable_path(path), "machine": results["machine"], "fingerprint": fingerprint(net),
             "config": net.cfg.model_dump(mode="json"),
             "parameters": sum(p.numel() for p in net.parameters()),
             "training": with_portable_paths(meta.get("training")), "points": []}
    earlier = results["models"].get(name)
    if earlier and earlier.get("fingerprint") == entry["fingerprint"]:
        # --update with the same weights: the points not measured again are kept (e.g. 1M added
        # to 1k-64k), each with the machine it was measured on
        entry["points"] = [dict(p, machine=p.get("machine", earlier["machine"])) for p in earlier["points"]
                           if not (p["task"] in task_list and p["length"] in length_list)]
    results["models"][name] = entry
    results.setdefault("max_train_len", (meta.get("training") or {}).get("max_train_len", 8192))
    if set(net.cfg.mixers) & {"swa", "mag"}:
        results.setdefault("swa_window", net.cfg.swa_window)

    def on_point(p: Point) -> None:
        entry["points"].append(p.to_dict())
        _print_point(name, p)

    run_eval(net, task_list, length_list, results["trials"], results["seed"], on_point=on_point,
             on_progress=lambda n: bar.advance(job, n), gap=results["gap"], prose=prose)


def _print_point(name: str, p: Point) -> None:
    err.print(f"{name:>14} {p.task:>18} {p.length:>9,} tokens: {p.correct}/{p.trials} "
              f"({100 * p.accuracy:.0f}%; value first {p.prefix_correct}), "
              f"value {p.value_nats:.2f} vs decoy {p.decoy_nats:.2f} "
              f"nats/byte (first byte {p.value_nats_by_byte[0]:.2f} vs "
              f"{p.decoy_nats_by_byte[0]:.2f}; its end {p.end_nats:.2f})  "
              f"{p.tokens_per_s:,.0f} tok/s")
