"""One chunk-kernel case at the serving shapes (tests/test_kernels.py's REAL: d=64, e=256, b=64, c=8,
16 heads) against the float64 reference, printed as one JSON line: the relative RMSE of the reads and
of each state tensor, or the error raised. bench/gpu_check.sh's `cases` stage runs each case in a
process of its own, since an illegal memory access poisons the whole CUDA context and every test after
it in the same process fails with it.

    python bench/kernel_case.py --depth 1 --opt muon --dtype bf16 [--warps N] [--stages N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atlas.kernels import chunk as kchunk  # noqa: E402
from tests import test_kernels as tk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, choices=(1, 2), default=1)
    p.add_argument("--opt", choices=tuple(kchunk.OPTIMIZERS), default="muon")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--precision", default="tf32")
    p.add_argument("--warps", type=int, default=0, help="num_warps (0: the launch's default)")
    p.add_argument("--stages", type=int, default=None, help="depth 1's num_stages (default: the launch's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args(argv)
    if args.stages is not None:
        kchunk.SCAN1_STAGES = args.stages
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shape = dict(tk.REAL, batch=args.batch, heads=args.heads)
    inp = tk.rounded(tk.make_case(args.depth, args.opt, **shape), dtype)
    row: dict = vars(args)
    try:
        got = tk.run_kernel(inp, chunk=shape["chunk"], optimizer=args.opt, precision=args.precision,
                            num_warps=args.warps or None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row["errors"] = tk.errors(got, tk.run_reference(inp, chunk=shape["chunk"], optimizer=args.opt))
    except Exception as exc:  # noqa: BLE001 - the case's outcome is the output
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(row), flush=True)
    return 1 if "error" in row else 0


if __name__ == "__main__":
    raise SystemExit(main())
