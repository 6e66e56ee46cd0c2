"""Fused chunk-scan kernel throughput on a GPU (written for an H200), beside the PyTorch reference.

For each batch B of sessions and length T (H=16 heads, d=64, expansion 4 so e=256, chunk b=64,
Omega window c=8, muon with 5 Newton-Schulz steps, bf16 activations, fp32 state) it times:

- the fused Triton kernel (`atlas.kernels.chunk_scan`) over the whole T, in its default mode (tf32
  products) and with 16-bit operands for the read and gradient products (`low_precision_dots`);
- the eager PyTorch reference (`chunk_scan_reference`, the engine's chunk step), called chunk by chunk;
- that reference under torch.compile, called chunk by chunk the same way;
- flash-linear-attention's `chunk_gated_delta_rule` (a d x d linear memory: a different model, here
  as a yardstick of a mature chunked recurrent kernel) at the same B, T, H, d, if `fla` imports.

and, once per B, the decode-time read (one token per session, all heads) by its kernel and by the
reference, as time per call and as the bandwidth of reading W1 and W2 once (the read's floor).

The references cost the same per chunk whatever T (the state is constant-size), so they are timed on
the first --ref-chunks chunks and reported per token. FLOPs are counted analytically (`scan_flops`)
and the same count is used for every ATLAS column; the fraction is of --peak-tflops (790: a dense bf16
figure for an H200; the default kernel mode runs its products in tf32, whose peak is half that).

    python bench/kernels.py                              # B 1,8,32 x T 4k,64k
    python bench/kernels.py --batches 8 --lengths 4k --sweep
    python bench/kernels.py --device cpu --batches 1 --lengths 160 --heads 2 --head-dim 16 --chunk 16 \
        --no-compile --no-fla --out /tmp/k.json      # the same code path in Triton's interpreter

Writes bench/results/kernels-<gpu>.json (machine, config, one row per B and T, rewritten after every
row so that a run cut short keeps what it measured) and prints a table. On CPU (`--device cpu`) the
kernels run in Triton's interpreter: a check that the benchmark runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atlas.engine.machine import describe_machine, load_average
from atlas.engine.model.reference_step import chunk_scan_reference, memory_read
from atlas.training.evaluation import parse_length

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def scan_flops(batch: int, heads: int, length: int, d: int, e: int, chunk: int, window: int,
               ns_steps: int) -> float:
    """Multiply-adds x 2 of the chunk scan, per (session, head), summed.

    Per committed chunk, with N = b + c - 1 key rows, r = min(d, e), C = max(d, e):
      reads              4 b d e          (h = q W2^T, then gelu(h) W1^T)
      key forward        4 N d e          (the same for the keys)
      gradients          6 N d e          (err^T u, err W1, ((err W1) * gelu'(h))^T x)
      Newton-Schulz      2 k (4 r^2 C + 2 r^3) for the two matrices (A = X X^T, A A, (n2 A + n3 A^2) X)
    and a trailing partial chunk of p tokens is only read: 4 p d e. Elementwise work is not counted."""
    n = chunk + window - 1
    r, c = min(d, e), max(d, e)
    per_chunk = 4 * chunk * d * e + 10 * n * d * e + 2 * ns_steps * (4 * r * r * c + 2 * r**3)
    full, part = divmod(length, chunk)
    return float(batch * heads * (full * per_chunk + 4 * part * d * e))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="sessions per run, comma-separated")
    p.add_argument("--lengths", default="4k,64k", help="tokens per session (k suffix allowed)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--ns-steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="timed kernel runs per point (the best is kept)")
    p.add_argument("--ref-chunks", type=int, default=32, help="chunks timed for the PyTorch references")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the reference step")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the reference")
    p.add_argument("--no-fla", action="store_true", help="skip the flash-linear-attention column")
    p.add_argument("--sweep", action="store_true",
                   help="also time kernel tunings (num_warps, block_e, ns_block) at the first B and T")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: Triton's interpreter, to check the script at small shapes")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def parse_list(spec: str) -> list[int]:
    return [parse_length(x) for x in spec.split(",") if x.strip()]


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], reps: int, dev: str) -> float:
    """Best wall time of `reps` runs, in seconds: CUDA events on a GPU, the host clock on CPU."""
    best = math.inf
    for _ in range(reps):
        if dev != "cuda":
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def make_inputs(batch: int, heads: int, length: int, d: int, e: int, window: int, chunk: int, seed: int,
                dev: str = "cuda", act: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Model-like inputs: unit-norm phi(q), phi(k) (phi itself is elementwise and outside the kernel),
    gates in (0, 1), a fresh state with W2 random and W1 zero as the model initialises them."""
    g = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=dev)
    nc = max(1, length // chunk)
    x = {
        "q": F.normalize(rn(batch, heads, length, d), dim=-1).to(act),
        "k": F.normalize(rn(batch, heads, length, d), dim=-1).to(act),
        "v": rn(batch, heads, length, d).to(act),
        "gamma": torch.sigmoid(rn(batch, heads, length) + 2).to(act),
        "eta": 0.5 * torch.sigmoid(rn(batch, heads, nc)),
        "alpha": torch.sigmoid(rn(batch, heads, nc) + 6),
        "theta": torch.sigmoid(rn(batch, heads, nc)),
    }
    w1 = torch.zeros(batch, heads, d, e, device=dev)
    w2 = rn(batch, heads, e, d) / math.sqrt(d)
    tail = window - 1
    x["state"] = {"W1": w1, "W2": w2, "S1": torch.zeros_like(w1), "S2": torch.zeros_like(w2),
                  "tail_k": torch.zeros(batch, heads, tail, d, device=dev, dtype=act),
                  "tail_v": torch.zeros(batch, heads, tail, d, device=dev, dtype=act),
                  "tail_gamma": torch.zeros(batch, heads, tail, device=dev, dtype=act)}
    return x


def run_kernel(x: dict[str, Any], args: argparse.Namespace, **tuning: Any) -> tuple[torch.Tensor, ...]:
    from atlas import kernels

    st = x["state"]
    return kernels.chunk_scan(x["q"], x["k"], x["v"], x["gamma"], x["eta"], x["alpha"], x["theta"],
                              (st["W1"], st["W2"]), (st["S1"], st["S2"]), st["tail_k"], st["tail_v"],
                              st["tail_gamma"], chunk_size=args.chunk, optimizer="muon",
                              ns_steps=args.ns_steps, **tuning)


def run_reference(step: Callable, x: dict[str, Any], args: argparse.Namespace, chunks: int) -> torch.Tensor:
    """The reads of the first `chunks` chunks by `step` (`chunk_scan_reference`, eager or compiled) called
    once per chunk, the state carried: a compiled call then covers one chunk, not an unrolled loop."""
    state, b = x["state"], args.chunk
    reads = []
    for j in range(chunks):
        sl, gates = slice(j * b, (j + 1) * b), slice(j, j + 1)
        r, new = step(x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["gamma"][:, :, sl],
                      x["eta"][..., gates], x["alpha"][..., gates], x["theta"][..., gates], state, b, "muon",
                      args.ns_steps)
        state = dict(state, **new)
        reads.append(r)
    return torch.cat(reads, 2)


def load_fla() -> tuple[Callable | None, str]:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # any import failure means: no such column
        return None, f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); " \
                     "pip install flash-linear-attention"
    return chunk_gated_delta_rule, "ok"


def time_fla(fla: Callable, x: dict[str, Any], reps: int, dev: str) -> float:
    """chunk_gated_delta_rule on (B, T, H, d) bf16 with the same q, k, v, a log-decay g and beta."""
    q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))
    bsz, t, h, d = q.shape
    g = F.logsigmoid(torch.full((bsz, t, h), 6.0, device=q.device))  # retention ~ alpha
    beta = x["gamma"].transpose(1, 2).contiguous()
    h0 = torch.zeros(bsz, h, d, d, device=q.device, dtype=torch.float32)
    call = lambda: fla(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True)
    call()
    sync(dev)
    return best_time(call, reps, dev)


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# (num_warps, block_e, ns_block, ns_gram): the default (8, 64, whole-matrix standard Newton-Schulz), one
# change at a time from it, and the Gram form of Newton-Schulz at the warp counts and blocks that were
# fastest on the H200 (16 warps ran at a third of 8 there, e-blocks of 128 under 64: kernels/README.md).
# Each costs a compile (~10 s).
SWEEP = [(8, 64, 256, False), (8, 64, 64, False), (8, 32, 256, False), (4, 64, 256, False),
         (8, 64, 256, True), (8, 64, 64, True), (4, 64, 256, True), (4, 64, 64, True)]


def measure_read(bsz: int, args: argparse.Namespace, act: torch.dtype) -> dict[str, Any]:
    """The decode read M_W(x) of one token per (session, head): bound by reading W (2 d e fp32 values).
    Repeated over one set of weights, so up to B=8 (16 MB) they come from L2, as they would for a
    batch decoding step after step; the JSON gives the bytes, the reader the cache."""
    from atlas import kernels

    dev, h, d = args.device, args.heads, args.head_dim
    e = args.expansion * d
    g = torch.Generator(device=dev).manual_seed(args.seed)
    weights = tuple(torch.randn(*shape, generator=g, device=dev) / math.sqrt(d)
                    for shape in ((bsz, h, d, e), (bsz, h, e, d)))
    x = F.normalize(torch.randn(bsz, h, 1, d, generator=g, device=dev), dim=-1).to(act)
    got = kernels.memory_read(weights, x)
    ref = memory_read(weights, x)
    sync(dev)
    reps = max(args.reps, 20) if dev == "cuda" else args.reps
    bytes_read = bsz * h * 2 * d * e * 4
    row: dict[str, Any] = {"batch": bsz, "bytes_of_weights": bytes_read, "rel_rmse": rel_rmse(got, ref)}
    calls = {"kernel": lambda: kernels.memory_read(weights, x), "eager": lambda: memory_read(weights, x)}
    for name, fn in calls.items():
        sec = best_time(fn, reps, dev)
        row[name] = {"seconds": sec, "gb_per_s": bytes_read / sec / 1e9}
    row["kernel_vs_eager"] = row["eager"]["seconds"] / row["kernel"]["seconds"]
    return row


def sweep(x: dict[str, Any], args: argparse.Namespace, flops: float, tokens: int) -> list[dict[str, Any]]:
    rows = []
    for num_warps, block_e, ns_block, ns_gram in SWEEP:
        tuning = dict(num_warps=num_warps, block_e=block_e, ns_block=ns_block, ns_gram=ns_gram)
        try:
            run_kernel(x, args, **tuning)
            s = best_time(lambda t=tuning: run_kernel(x, args, **t), args.reps, args.device)
            rows.append(dict(tuning, seconds=s, tokens_per_s=tokens / s, tflops=flops / s / 1e12))
        except Exception as exc:  # a tuning that does not compile or fit is a result too
            rows.append(dict(tuning, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        print("  sweep", rows[-1], flush=True)
    return rows


def measure(bsz: int, t: int, args: argparse.Namespace, compiled: Callable | None, fla: Callable | None,
            fla_status: str, act: torch.dtype) -> dict[str, Any]:
    from atlas.kernels import chunk as kchunk

    h, d, b, c = args.heads, args.head_dim, args.chunk, args.window
    e = args.expansion * d
    dev = args.device
    x = make_inputs(bsz, h, t, d, e, c, b, args.seed, dev=dev, act=act)
    flops = scan_flops(bsz, h, t, d, e, b, c, args.ns_steps)
    tokens = bsz * t
    # One program per (session, head), each a sequential loop over chunks: under one per
    # multiprocessor, the rest of the chip idles whatever the kernel does.
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else None
    row: dict[str, Any] = {"batch": bsz, "length": t, "tokens": tokens, "gflop": flops / 1e9,
                           "programs": bsz * h, "multiprocessors": sms}

    def per(seconds: float) -> dict[str, float]:
        tflops = flops / seconds / 1e12
        return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": tflops,
                "fraction_of_peak": tflops / args.peak_tflops}

    t0 = time.perf_counter()
    reads = run_kernel(x, args)[0]  # compiles on first use
    sync(dev)
    row["kernel_first_call_s"] = time.perf_counter() - t0
    row["kernel"] = per(best_time(lambda: run_kernel(x, args), args.reps, dev))
    row["kernel"]["tuning_ns_block_block_e"] = [v for k, v in kchunk._FITTED.items() if k[:2] == (d, e)]
    run_kernel(x, args, low_precision_dots=True)
    row["kernel_bf16_dots"] = per(best_time(lambda: run_kernel(x, args, low_precision_dots=True), args.reps,
                                            dev))

    n_ref = min(args.ref_chunks, t // b)
    ref_tokens, ref_flops = bsz * n_ref * b, scan_flops(bsz, h, n_ref * b, d, e, b, c, args.ns_steps)

    def ref(step: Callable) -> dict[str, float]:
        s = best_time(lambda: run_reference(step, x, args, n_ref), 1, dev)
        return {"seconds": s, "chunks_timed": n_ref, "tokens_per_s": ref_tokens / s,
                "tflops": ref_flops / s / 1e12}

    run_reference(chunk_scan_reference, x, args, 1)
    eager_reads = run_reference(chunk_scan_reference, x, args, n_ref)
    row["eager"] = ref(chunk_scan_reference)
    row["kernel_vs_eager_reads_rel_rmse"] = rel_rmse(reads[:, :, :n_ref * b], eager_reads)
    if compiled is not None:
        try:
            run_reference(compiled, x, args, min(3, n_ref))  # compile and warm up
            row["compiled"] = ref(compiled)
        except Exception as exc:  # report, and keep the other columns
            row["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if fla is not None:
        try:
            s = time_fla(fla, x, args.reps, dev)
            row["fla"] = {"seconds": s, "tokens_per_s": tokens / s}
        except Exception as exc:
            row["fla"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    else:
        row["fla"] = {"skipped": fla_status}
    k_tps = row["kernel"]["tokens_per_s"]
    row["ratios"] = {
        "kernel_vs_eager": k_tps / row["eager"]["tokens_per_s"],
        "kernel_vs_compiled": k_tps / row["compiled"]["tokens_per_s"] if "compiled" in row else None,
        "kernel_vs_fla": k_tps / row["fla"]["tokens_per_s"] if "tokens_per_s" in row["fla"] else None,
    }
    if args.sweep:
        row["sweep"] = sweep(x, args, flops, tokens)
    return row


def summary(row: dict[str, Any], peak: float) -> str:
    fla_txt = f"{row['fla']['tokens_per_s']:.3g}" if "tokens_per_s" in row["fla"] else "-"
    comp_txt = f"{row['compiled']['tokens_per_s']:.3g}" if "compiled" in row else "-"
    ratios = row["ratios"]
    vs = lambda r: "-" if r is None else f"{r:.2f}x"
    return (f"B={row['batch']:3d} T={row['length']:6d}  kernel {row['kernel']['tokens_per_s']:.3g} tok/s "
            f"{row['kernel']['tflops']:.1f} TFLOP/s ({100 * row['kernel']['fraction_of_peak']:.1f}% of "
            f"{peak:.0f})  bf16-dots {row['kernel_bf16_dots']['tokens_per_s']:.3g}  "
            f"eager {row['eager']['tokens_per_s']:.3g}  compiled {comp_txt}  fla {fla_txt}  "
            f"kernel/eager {vs(ratios['kernel_vs_eager'])}  /compiled {vs(ratios['kernel_vs_compiled'])}  "
            f"/fla {vs(ratios['kernel_vs_fla'])}  reads err {row['kernel_vs_eager_reads_rel_rmse']:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = args.device
    if min(parse_list(args.lengths)) < args.chunk:
        print(f"every length must hold at least one chunk ({args.chunk} tokens)", file=sys.stderr)
        return 2
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (the fused kernels are Triton GPU kernels); none found. "
              "`--device cpu` runs it in Triton's interpreter at small shapes, a check and not a "
              "measurement.", file=sys.stderr)
        return 2
    if dev == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported, below
    from atlas import kernels

    if not kernels.available():
        print("bench/kernels.py needs Triton: pip install -e '.[gpu]'", file=sys.stderr)
        return 2
    act = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter has no bf16 dots
    info = describe_machine(dev)
    info["triton"] = __import__("triton").__version__
    info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    fla, fla_status = (None, "skipped (--no-fla)") if args.no_fla else load_fla()
    if fla is None:
        print(f"fla column: {fla_status}", flush=True)
    compiled = None
    if not args.no_compile:
        # dynamic=None: static for the first batch size, then one dynamic recompile for the others
        compiled = torch.compile(chunk_scan_reference, mode=args.compile_mode, backend=args.compile_backend)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu-interpreter"
    out = args.out or RESULTS / f"kernels-{name.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    d = args.head_dim
    result = {
        "benchmark": "kernels", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "config": {"heads": args.heads, "head_dim": d, "mem_hidden": args.expansion * d,
                   "chunk": args.chunk, "window": args.window, "optimizer": "muon", "ns_steps": args.ns_steps,
                   "activations": str(act).removeprefix("torch."), "state": "float32",
                   "peak_tflops": args.peak_tflops, "reps": args.reps, "ref_chunks": args.ref_chunks,
                   "compile": None if args.no_compile else {"mode": args.compile_mode,
                                                            "backend": args.compile_backend}},
        "flops_formula": scan_flops.__doc__, "fla": fla_status, "complete": False, "results": [],
        "decode_read": [],
    }
    for bsz in parse_list(args.batches):
        read = measure_read(bsz, args, act)
        result["decode_read"].append(read)
        print(f"B={bsz:3d} decode read: kernel {1e6 * read['kernel']['seconds']:.1f} us "
              f"({read['kernel']['gb_per_s']:.0f} GB/s of W)  eager {1e6 * read['eager']['seconds']:.1f} us  "
              f"err {read['rel_rmse']:.1e}", flush=True)
        for t in parse_list(args.lengths):
            row = measure(bsz, t, args, compiled, fla, fla_status, act)
            args.sweep = False  # one sweep, at the first point
            result["results"].append(row)
            out.write_text(json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
            print(summary(row, args.peak_tflops), flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    info["load_average_at_end"] = load_average()
    result["complete"] = True
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("== table")
    print("\n".join(summary(r, args.peak_tflops) for r in result["results"]))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
