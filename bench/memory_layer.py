"""The memory layer alone: this project's `AtlasMemory` against lucidrains' titans-pytorch `NeuralMemory`.

Both read and write a 2-layer MLP memory (expansion 4) per head of width 64, on chunks of 64 tokens, in
fp32, on one sequence of 4,096 tokens (default). ATLAS does more per chunk: the Omega rule over a window
of c = 8 tokens and 5 Newton-Schulz steps (Muon) on both memory matrices. `AtlasMemory` runs the way the
served model runs a fed piece, as one span of whole chunks (`AtlasMemory.forward`: the projections of
all rows at once, then the chunk steps one by one; chunk by chunk where the measured tree has no
spans), under `torch.inference_mode`; `NeuralMemory.forward` takes the whole sequence. Each side's
matrix-product FLOPs are counted once (torch's FlopCounterMode): their ratio is the speed ratio the
two would have at one FLOP rate, which bounds what a faster implementation of the same arithmetic
can reach. Repetitions are interleaved
(ATLAS, titans, ATLAS, titans, ...) so that machine noise hits both alike; ratios are titans' time over
ATLAS' time per repetition (> 1: ATLAS is faster), reported as min, median and max. ATLAS runs once per
Newton-Schulz precision asked for (`--ns-precision`, ATLAS_NS_PRECISION: fp32, the default, and bf16 as
Muon runs it), each interleaved with the others and with titans.

titans-pytorch is not a dependency of this project; install it into the environment for this
benchmark only (it must not replace the pinned torch: check with `pip install --dry-run` first):

    .venv/bin/pip install titans-pytorch
    python bench/memory_layer.py                         # dim 256/4 heads and 1024/16 heads, 1 thread
    python bench/memory_layer.py --dims 256 --reps 3 --threads 2 --ns-precision fp32

Without titans-pytorch it measures ATLAS alone and says so. `--ref COMMIT` also measures ATLAS as an
earlier commit has it (Newton-Schulz in fp32), in a process of its own that imports that commit and
times one run each time it is asked, interleaved with the rest: the before/after ratio of a change,
in the same run.

    python bench/memory_layer.py --ref HEAD~1 --reps 7

Writes bench/results/memory-layer-cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from earlier_tree import describe_tree, earlier_tree
from ingest import spread  # bench/ingest.py: min, median and max of a list of ratios

from atlas.engine import ModelConfig
from atlas.engine.machine import describe_machine, load_average
from atlas.engine.model.memory import AtlasMemory
from atlas.kernels.settings import kernel_settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HEAD_DIM = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="256,1024", help="model widths; heads = dim / 64")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-titans", action="store_true", help="measure ATLAS alone")
    p.add_argument("--ns-precision", default="fp32,bf16",
                   help="ATLAS' Newton-Schulz precisions (ATLAS_NS_PRECISION), each measured")
    p.add_argument("--ref", default=None, help="also measure ATLAS at this earlier commit (NS fp32)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/memory-layer-cpu.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def atlas_runner(dim: int, tokens: int, chunk: int) -> tuple[Callable[[], None], dict[str, Any]]:
    cfg = ModelConfig(d_model=dim, n_heads=dim // HEAD_DIM, chunk_size=chunk, swa_window=max(256, chunk))
    mem = AtlasMemory(cfg).eval()
    x = torch.randn(1, tokens, dim)
    commit = torch.ones(1, dtype=torch.bool)
    step = tokens if tokens % chunk == 0 and takes_spans(mem, chunk) else chunk

    def run() -> None:
        with torch.inference_mode():
            st = mem.init_state(1, torch.float32)
            for j in range(0, tokens - tokens % chunk, step):
                _, st = mem.forward(x[:, j:j + step], st, commit, torch.full((1,), step - 1))

    params = sum(p.numel() for p in mem.parameters())
    return run, {"parameters": params, "omega_window": cfg.omega_window, "ns_steps": cfg.ns_steps,
                 "optimizer": cfg.optimizer, "mem_hidden": cfg.mem_hidden, "rows_per_call": step}


def takes_spans(mem: AtlasMemory, chunk: int) -> bool:
    """Whether this tree's layer steps a span of several whole chunks in one call (earlier trees
    take one chunk per call)."""
    x = torch.zeros(1, 2 * chunk, mem.cfg.d_model)
    try:
        with torch.inference_mode():
            mem.forward(x, mem.init_state(1, torch.float32), torch.ones(1, dtype=torch.bool),
                        torch.full((1,), 2 * chunk - 1))
    except ValueError:
        return False
    return True


class _NoModules:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks fail on titans'
    torch.func transforms under no_grad; only the global count is wanted."""

    parents = {"Global"}
    is_bw = False

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def matmul_flops(fn: Callable[[], None]) -> int:
    """The FLOPs of the matrix products of one run of fn (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()  # type: ignore[assignment]
    with counter:
        fn()
    return int(counter.get_total_flops())


def titans_runner(dim: int, tokens: int, chunk: int) -> tuple[Callable[[], None], dict[str, Any]] | None:
    try:
        from titans_pytorch import NeuralMemory  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    mem = NeuralMemory(dim, chunk_size=chunk, dim_head=HEAD_DIM, heads=dim // HEAD_DIM,
                       default_model_kwargs={"depth": 2, "expansion_factor": 4.0}).eval()
    x = torch.randn(1, tokens, dim)

    def run() -> None:
        # Its inner gradients are torch.func transforms, which ignore an outer no_grad.
        with torch.no_grad():
            mem(x)

    params = sum(p.numel() for p in mem.parameters())
    from importlib.metadata import version
    return run, {"parameters": params, "version": version("titans-pytorch")}


class EarlierAtlas:
    """ATLAS of an earlier commit (the folder `importable` on PYTHONPATH) in a process of its own,
    which builds the same layer (same seed), warms it up, and times one run per request."""

    def __init__(self, importable: Path, dim: int, args: argparse.Namespace):
        cmd = [sys.executable, __file__, "--ref-worker", "--dims", str(dim), "--tokens", str(args.tokens),
               "--chunk", str(args.chunk), "--threads", str(args.threads), "--seed", str(args.seed)]
        env = {**os.environ, "PYTHONPATH": str(importable), "ATLAS_NS_PRECISION": "fp32"}
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=tempfile.gettempdir())
        self.info: dict[str, Any] = json.loads(self._reply())

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the earlier commit's worker stopped (exit {self.proc.wait()})")
        return line

    def __call__(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def ref_worker(args: argparse.Namespace) -> None:
    """The other end of `EarlierAtlas`: `atlas` here is the earlier commit."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run, info = atlas_runner(int(args.dims), args.tokens, args.chunk)
    run()  # warm-up
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        print(timed(run), flush=True)


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def with_ns_precision(precision: str, fn: Callable[[], None]) -> Callable[[], None]:
    """fn with ATLAS_NS_PRECISION set to `precision` (the settings are re-read for each call)."""

    def run() -> None:
        os.environ["ATLAS_NS_PRECISION"] = precision
        kernel_settings.cache_clear()
        fn()

    return run


def bench_dim(dim: int, args: argparse.Namespace, earlier: tuple[str, Path] | None) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    ours, ours_info = atlas_runner(dim, args.tokens, args.chunk)
    ref = EarlierAtlas(earlier[1], dim, args) if earlier is not None else None
    precisions = [p.strip() for p in args.ns_precision.split(",") if p.strip()]
    runs = {p: with_ns_precision(p, ours) for p in precisions}
    theirs = None if args.no_titans else titans_runner(dim, args.tokens, args.chunk)
    for run in runs.values():  # warm-up: allocator, lazy init
        run()
    if theirs is not None:
        theirs[0]()
    flops = {"atlas": matmul_flops(ours), "titans": matmul_flops(theirs[0]) if theirs is not None else None}
    t_ours: dict[str, list[float]] = {p: [] for p in precisions}
    t_theirs: list[float] = []
    t_ref: list[float] = []
    for _ in range(args.reps):
        for p, run in runs.items():
            t_ours[p].append(timed(run))
            if p == precisions[0]:
                if theirs is not None:
                    t_theirs.append(timed(theirs[0]))
                if ref is not None:
                    t_ref.append(ref())
    if ref is not None:
        ref.close()
    row: dict[str, Any] = {
        "dim": dim, "heads": dim // HEAD_DIM, "head_dim": HEAD_DIM, "tokens": args.tokens,
        "chunk": args.chunk, "atlas": {},
    }
    for p, times in t_ours.items():
        row["atlas"][p] = {**ours_info, "ns_precision": p, "seconds": [round(t, 4) for t in times],
                           "best_tok_s": round(args.tokens / min(times), 1),
                           "median_tok_s": round(args.tokens / statistics.median(times), 1),
                           "matmul_gflop": round(flops["atlas"] / 1e9, 3),
                           "best_gflop_s": round(flops["atlas"] / 1e9 / min(times), 2)}
    if theirs is not None and flops["titans"] is not None:
        row["titans"] = {**theirs[1], "seconds": [round(t, 4) for t in t_theirs],
                         "best_tok_s": round(args.tokens / min(t_theirs), 1),
                         "median_tok_s": round(args.tokens / statistics.median(t_theirs), 1),
                         "matmul_gflop": round(flops["titans"] / 1e9, 3),
                         "best_gflop_s": round(flops["titans"] / 1e9 / min(t_theirs), 2)}
        # titans' FLOPs over ATLAS': the ATLAS/titans speed ratio if both ran at one FLOP rate
        row["ratio_at_equal_flop_rate"] = round(flops["titans"] / flops["atlas"], 3)
        row["speedup"] = {p: {"best_of": round(min(t_theirs) / min(times), 3),
                              **spread([b / a for a, b in zip(times, t_theirs, strict=True)])}
                          for p, times in t_ours.items()}
    if earlier is not None and ref is not None:
        row["earlier"] = {**ref.info, "commit": earlier[0], "ns_precision": "fp32",
                          "seconds": [round(t, 4) for t in t_ref],
                          "best_tok_s": round(args.tokens / min(t_ref), 1),
                          "median_tok_s": round(args.tokens / statistics.median(t_ref), 1)}
        row["speedup_over_earlier"] = {p: {"best_of": round(min(t_ref) / min(times), 3),
                                           **spread([b / a for a, b in zip(times, t_ref, strict=True)])}
                                       for p, times in t_ours.items()}
    return row


def summary_line(row: dict[str, Any]) -> str:
    line = f"dim {row['dim']:>5} / {row['heads']:>2} heads:"
    if "titans" in row:
        t = row["titans"]
        line += (f" titans {t['best_tok_s']:>9,.0f} tok/s ({t['matmul_gflop']:.2f} GFLOP, "
                 f"{t['best_gflop_s']:.1f} GFLOP/s); ratio at one FLOP rate "
                 f"{row['ratio_at_equal_flop_rate']:.2f}x;")
    if "earlier" in row:
        line += f" ATLAS at {row['earlier']['commit'][:8]} {row['earlier']['best_tok_s']:>9,.0f} tok/s;"
    for p, r in row["atlas"].items():
        line += (f"\n  ATLAS, Newton-Schulz in {p}: {r['best_tok_s']:>9,.0f} tok/s "
                 f"({r['matmul_gflop']:.2f} GFLOP, {r['best_gflop_s']:.1f} GFLOP/s)")
        for key, name in (("speedup", "ATLAS/titans"), ("speedup_over_earlier", "over the earlier commit")):
            if key in row:
                s = row[key][p]
                line += (f"; {name} best-of {s['best_of']:.2f}x, per-rep min {s['min']:.2f}x "
                         f"median {s['median']:.2f}x max {s['max']:.2f}x")
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ref_worker:
        ref_worker(args)
        return
    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    if any(d % HEAD_DIM for d in dims):
        raise SystemExit(f"every dim must be a multiple of {HEAD_DIM}")
    info = describe_machine("cpu")
    if not args.no_titans and titans_runner(HEAD_DIM, args.chunk, args.chunk) is None:
        print("titans-pytorch is not installed (pip install titans-pytorch): measuring ATLAS alone")
        args.no_titans = True
    started = time.perf_counter()
    rows = []
    with contextlib.ExitStack() as stack:
        earlier = stack.enter_context(earlier_tree(args.ref)) if args.ref else None
        for dim in dims:
            row = bench_dim(dim, args, earlier)
            rows.append(row)
            print(summary_line(row), flush=True)
    result = {
        "benchmark": "memory_layer",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**info, "load_average_at_end": load_average()},
        "threads": args.threads,
        "reps": args.reps,
        "ns_precisions": args.ns_precision,
        "tree": describe_tree(),
        "results": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = args.out or RESULTS / "memory-layer-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out.name}")


if __name__ == "__main__":
    main()
