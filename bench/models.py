"""Model sizes on this machine: for each model config, the parameters, the weights' bytes in fp32 and
bf16, the bytes of one session's state (the same in both: the state is fp32 whatever the weights,
docs/model.md "Precision"), and how fast the model reads a document in fp32 and in bf16.

    python bench/models.py                                   # configs/models/*.json on the CPU
    python bench/models.py --configs /tmp/small.json --tokens 1024 --repeats 2 --time-budget 120

Speed: each model reads `--tokens` tokens of generated prose into a fresh session (`Atlas.feed`,
random weights: the speed depends on neither), fp32 and bf16 interleaved (A, B, A, B, ...) so that a
change in the machine's load hits both alike; the table gives the median and the spread (min to
max) of the repetitions, and each read's CPU share (the CPU time its threads got over the wall time
they needed: below 1 when other processes took cores; the machine's load is recorded too).

The run keeps within `--time-budget` seconds. Models go smallest first, with `--repeats`
repetitions for the smallest down to one for the largest; each gets a share of the time left in
proportion to its parameters times its repetitions, and after a warm-up that measures its speed it
does the repetitions that fit in its share (at least one). The largest model gets the
time left; if that is too short for one read per dtype at `--tokens`, it reads fewer tokens (in
every dtype), which its entry says (`tokens_cut`). The others always read `--tokens`.

Writes bench/results/models-<device>.json (machine, settings, one entry per model) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from documents import generated_text
from rich.console import Console
from rich.table import Table

from atlas.engine import Atlas, ModelConfig
from atlas.engine.api import resolve_device
from atlas.engine.machine import describe_machine, load_average, portable_path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONFIGS = REPO / "configs" / "models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
WARM_TOKENS = 256  # tokens of the timed warm-up read that estimates a model's speed
MIN_TOKENS = 512  # the fewest tokens a model too slow for --tokens reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=Path, nargs="*", default=None,
                   help="model config files (config.json format; default: configs/models/*.json)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--tokens", type=int, default=4096, help="tokens each timed read takes")
    p.add_argument("--repeats", type=int, default=3, help="most repetitions per model and dtype")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds for the whole run; repetitions (and if need be tokens) are cut to fit")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: every core this process may use)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/models-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_config(path: Path) -> ModelConfig:
    """A config.json-format model config: "model_type", "format_version" and the ModelConfig fields."""
    try:
        from atlas.engine.checkpoint import read_model_config
    except ImportError:  # an engine without the config.json reader: the fields, flat
        doc = json.loads(path.read_text())
        fields = {k: v for k, v in doc.items() if k in ModelConfig.model_fields}
        return ModelConfig(**fields)
    return read_model_config(path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_read(atlas: Atlas, ids: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all of this process's threads) to read `ids` into a fresh session."""
    state = atlas.new_state()
    sync(atlas.device)
    t0, c0 = time.perf_counter(), time.process_time()
    state, _ = atlas.feed(state, ids)
    sync(atlas.device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert state.tokens == [len(ids)]
    return dt, cpu


def cpu_share(wall_s: float, cpu_s: float) -> float:
    """The fraction of its threads' time the read got the cores for: 1 on an idle machine, less
    when other processes took cores (then the wall-clock speed understates the model's)."""
    return round(cpu_s / (wall_s * torch.get_num_threads()), 2)


def summary(rates: list[float]) -> dict[str, Any]:
    med = statistics.median(rates)
    return {"median": round(med, 1), "min": round(min(rates), 1), "max": round(max(rates), 1),
            "spread_pct": round(100 * (max(rates) - min(rates)) / med, 1),
            "runs": [round(r, 1) for r in rates]}


def target_repeats(i: int, n: int, repeats: int) -> int:
    """Repetitions for the i-th of n models (smallest first): `repeats` down to 1."""
    return repeats if n == 1 else max(1, round(repeats - (repeats - 1) * i / (n - 1)))


def plan(rates: dict[str, float], tokens: int, chunk: int, budget_s: float, repeats: int,
         may_cut: bool) -> tuple[int, int, str | None]:
    """(tokens, repetitions, why the tokens were cut) for one model, from its warm-up speeds."""
    pair_s = sum(tokens / r for r in rates.values())  # one read in every dtype
    if pair_s <= budget_s or not may_cut:
        return tokens, max(1, min(repeats, int(budget_s // pair_s))), None
    per_token_s = pair_s / tokens
    cut = max(MIN_TOKENS, int(budget_s / per_token_s) // chunk * chunk)
    cut = min(cut, tokens)
    why = (f"{tokens} tokens in every dtype would take about {pair_s:.0f}s (warm-up speeds), over the "
           f"{budget_s:.0f}s left of the time budget: {cut} tokens instead")
    return cut, 1, why


def bench_model(console: Console, path: Path, cfg: ModelConfig, args: argparse.Namespace,
                device: torch.device, dtypes: list[str], budget_s: float, repeats: int, may_cut: bool,
                text_ids: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    base = Atlas.from_config(cfg, seed=args.seed, device=device)
    # The same weights in every dtype (the speed does not depend on them, but the comparison is fair).
    models = {name: base if DTYPES[name] == torch.float32
              else Atlas(copy.deepcopy(base.model).to(DTYPES[name])) for name in dtypes}
    del base
    first = models[dtypes[0]]
    sizes = {name: a.state_bytes for name, a in models.items()}
    assert len(set(sizes.values())) == 1, f"state bytes differ between dtypes: {sizes}"
    build_s = time.perf_counter() - started
    console.print(f"[bold]{path.stem}[/]: {first.parameters / 1e6:.1f}M parameters, state "
                  f"{first.state_bytes / 2**20:.1f} MiB per session (built in {build_s:.0f}s)")

    # Warm-up: a short read (allocator, oneDNN's kernels), then a timed one for the plan.
    warm = torch.tensor(text_ids[:WARM_TOKENS], dtype=torch.long, device=device)
    warm_rates = {}
    for name, a in models.items():
        timed_read(a, warm[:cfg.chunk_size])
        warm_rates[name] = len(warm) / timed_read(a, warm)[0]
    spent = time.perf_counter() - started
    tokens, repeats, why = plan(warm_rates, args.tokens, cfg.chunk_size, max(1.0, budget_s - spent), repeats,
                                may_cut)
    console.print("  warm-up: " + ", ".join(f"{n} {r:,.0f} tok/s" for n, r in warm_rates.items())
                  + f"; {repeats} x {tokens} tokens per dtype" + (f" ([yellow]{why}[/])" if why else ""))

    ids = torch.tensor(text_ids[:tokens], dtype=torch.long, device=device)
    rates: dict[str, list[float]] = {name: [] for name in dtypes}
    shares: dict[str, list[float]] = {name: [] for name in dtypes}
    loads = []
    for rep in range(repeats):  # interleaved: A, B, A, B, ...
        for name, a in models.items():
            wall_s, cpu_s = timed_read(a, ids)
            rates[name].append(tokens / wall_s)
            shares[name].append(cpu_share(wall_s, cpu_s))
        loads.append(load_average())
        done = ", ".join(f"{n} {r[-1]:,.1f} tok/s (cpu share {shares[n][-1]:.2f})" for n, r in rates.items())
        console.print(f"  repetition {rep + 1}: {done}")
    speed = {name: dict(summary(r), cpu_share=shares[name]) for name, r in rates.items()}
    entry: dict[str, Any] = {
        "name": path.stem,
        "config_file": portable_path(path),
        "config": cfg.model_dump(mode="json"),
        "parameters": first.parameters,
        "weight_bytes": {name: a.weight_bytes for name, a in models.items()},
        "state_bytes": first.state_bytes,
        "tokens": tokens,
        "tokens_cut": why,
        "repeats": repeats,
        "warmup_tok_s": {n: round(r, 1) for n, r in warm_rates.items()},
        "ingest_tok_s": speed,
        "load_average_after_each_repetition": loads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if "float32" in speed and len(speed) > 1:
        entry["speedup_vs_float32"] = {n: round(s["median"] / speed["float32"]["median"], 2)
                                       for n, s in speed.items() if n != "float32"}
    return entry


def run(args: argparse.Namespace) -> dict[str, Any]:
    console = Console(width=None if Console().is_terminal else 170)  # a log file gets the whole table
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or cores)
    device = resolve_device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes takes {', '.join(DTYPES)}")
    paths = args.configs if args.configs else sorted(CONFIGS.glob("*.json"))
    if not paths:
        raise SystemExit(f"no model configs in {portable_path(CONFIGS)}; give --configs FILE ...")
    configs = {p: read_config(p) for p in paths}
    params = {p: _parameters(c) for p, c in configs.items()}
    # Smallest first: time a small model leaves unused goes to the bigger ones.
    paths = sorted(paths, key=lambda p: params[p])
    reps = {p: target_repeats(i, len(paths), args.repeats) for i, p in enumerate(paths)}
    info = describe_machine(device)
    console.print(f"[bold]model sizes[/] on {info['cpu_model']} ({info['torch_threads']} threads), "
                  f"device {device}, {len(paths)} models, budget {args.time_budget:.0f}s")
    text_ids = list(generated_text(args.tokens * 2, args.seed).encode())[:args.tokens]
    started = time.perf_counter()
    entries = []
    for i, path in enumerate(paths):
        left = args.time_budget - (time.perf_counter() - started)
        share = left * params[path] * reps[path] / sum(params[p] * reps[p] for p in paths[i:])
        entries.append(bench_model(console, path, configs[path], args, device, dtypes, share, reps[path],
                                   i == len(paths) - 1, text_ids))
    result = {
        "benchmark": "models",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**info, "load_average_at_end": load_average(),
                    "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "time_budget_s": args.time_budget,
                     "dtypes": dtypes, "document": "generated", "seed": args.seed,
                     "order": "interleaved: every dtype once per repetition, in the order of dtypes",
                     "repeats_per_model": "--repeats for the smallest model down to 1 for the largest, "
                                          "fewer where the time budget allows fewer; only the largest may "
                                          "read fewer than `tokens` (its tokens_cut says why)"},
        "models": entries,
        "total_s": round(time.perf_counter() - started, 1),
    }
    show(console, result)
    return result


def _parameters(cfg: ModelConfig) -> int:
    """Parameters of a model of `cfg`, counted on the meta device (nothing allocated)."""
    from atlas.engine.model import AtlasModel

    with torch.device("meta"):
        return sum(p.numel() for p in AtlasModel(cfg).parameters())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def show(console: Console, result: dict[str, Any]) -> None:
    m, dtypes = result["machine"], result["settings"]["dtypes"]
    table = Table(title=f"ATLAS model sizes, {m['device']} ({m['cpu_model']}), {m['torch_threads']} threads")
    table.add_column("model")
    table.add_column("parameters", justify="right")
    for d in dtypes:
        table.add_column(f"{SHORT[d]} weights MiB", justify="right")
    table.add_column("state MiB/session", justify="right")
    table.add_column("tokens x reps", justify="right")
    for d in dtypes:
        table.add_column(f"{SHORT[d]} ingest tok/s (min-max)", justify="right")
    table.add_column("least cpu share", justify="right")
    for e in result["models"]:
        speeds = [f"{s['median']:,.1f} ({s['min']:,.0f}-{s['max']:,.0f})"
                  for s in (e["ingest_tok_s"][d] for d in dtypes)]
        cut = "*" if e["tokens_cut"] else ""
        weights = [_mib(e["weight_bytes"][d]) for d in dtypes]
        least = min(x for d in dtypes for x in e["ingest_tok_s"][d]["cpu_share"])
        table.add_row(e["name"], f"{e['parameters'] / 1e6:,.1f}M", *weights, _mib(e["state_bytes"]),
                      f"{e['tokens']}{cut} x {e['repeats']}", *speeds, f"{least:.2f}")
    console.print(table)
    for e in result["models"]:
        if e["tokens_cut"]:
            console.print(f"* {e['name']}: {e['tokens_cut']}")
    console.print(f"total {result['total_s']}s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    out = args.out or RESULTS / f"models-{result['machine']['device'].split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"wrote {portable_path(out)}")


if __name__ == "__main__":
    main()
