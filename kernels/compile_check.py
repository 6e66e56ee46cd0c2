"""Compile the kernels for a GPU architecture on any machine, no GPU needed, and report what each
configuration needs: shared memory (against the device limit), registers and spills (from ptxas -v).

    python -m atlas.kernels.compile_check                 # the serving shapes for sm_90 (H100/H200)
    python -m atlas.kernels.compile_check --arch 90 --all  # also the fallbacks and precision modes

Triton compiles to PTX and cubin on the host; only loading a kernel needs the device. A configuration
that needs more shared memory than the device has fails at launch (the chunk launch then takes the
next tuning of its ladder); one that spills registers runs, slower. Run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # bytes per block (opt-in maximum)
DEFAULT_ARCH = 90  # H100/H200


def _ptxas_info(ptx: str, arch: int) -> str:
    """ptxas -v's register and spill lines, with the first bundled ptxas that takes this PTX."""
    import triton

    target = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")
        for ptxas in sorted(glob.glob(bins)):
            cmd = [ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode == 0:
                return " ".join(line.split("info    :")[-1].strip() for line in out.stderr.splitlines()
                                if "registers" in line or "spill" in line)
    return "ptxas -v unavailable"


def compile_one(fn: Any, types: dict[str, str], consts: dict[str, Any], num_warps: int, num_stages: int,
                arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: types.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    shared = int(k.metadata.shared)
    return {"compile_s": round(time.perf_counter() - t0, 1), "shared": shared,
            "fits": shared <= SMEM_LIMIT.get(arch, SMEM_LIMIT[DEFAULT_ARCH]),
            "ptxas": _ptxas_info(k.asm["ptx"], arch)}


def configurations(full: bool, quick: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(kernel, settings) pairs: the serving shapes (d=64, e=256, b=64, c=8), bf16 activations."""
    from atlas.kernels import chunk, read

    blocked = chunk.NS_BLOCK_FALLBACK
    base = dict(dtype="bf16", d=64, e=256, chunk=64, tail=7, optimizer="muon", ns_block=256,
                block_e=chunk.SCAN_BLOCK_E, num_warps=chunk.SCAN_WARPS, dots="fp32", precision="tf32",
                reads=True, counts=True)
    read_base = dict(dtype="bf16", d=64, e=256, block_e=read.READ_BLOCK_E, num_warps=read.READ_WARPS)
    scan1 = dict(base, e=64, num_warps=chunk.SCAN1_WARPS)
    # Every depth-1 optimizer: gd and momentum are the ones whose loop the software pipeliner takes.
    scan1_all = [("scan1", dict(scan1, optimizer=opt)) for opt in ("muon", "momentum", "gd")]
    if quick:
        return [("scan2", base), *scan1_all, ("read2", read_base)]
    out = [("scan2", base), ("scan2", dict(base, ns_block=blocked)),
           ("scan2", dict(base, reads=False, counts=False)), *scan1_all,
           ("read2", read_base)]
    if full:
        out += [("scan2", dict(base, dots="bf16")), ("scan2", dict(base, dtype="fp32")),
                ("scan2", dict(base, optimizer="gd")), ("scan2", dict(base, optimizer="momentum")),
                ("scan2", dict(base, precision="tf32x3", ns_block=blocked)),
                ("scan2", dict(base, ns_block=blocked, block_e=32)),
                ("read2", dict(read_base, block_e=64, num_warps=4))]
    return out


def check(kind: str, cfg: dict[str, Any], arch: int) -> dict[str, Any]:
    import triton.language as tl

    from atlas.kernels import chunk, read
    from atlas.kernels._common import next_pow2

    act = "*" + cfg["dtype"]
    d, e = cfg["d"], cfg["e"]
    if kind == "read2":
        return compile_one(read._read2_kernel, {"x_ptr": act, "w1_ptr": "*fp32", "w2_ptr": "*fp32",
                                                "out_ptr": "*fp32"},
                           dict(D=d, E=e, BLOCK_D=next_pow2(d), BLOCK_E=min(cfg["block_e"], e)),
                           cfg["num_warps"], 3, arch)
    types = {n: act for n in ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "tk_ptr", "tv_ptr", "tg_ptr", "out_ptr")}
    types.update({n: "*fp32" for n in ("eta_ptr", "alpha_ptr", "theta_ptr", "w_ptr", "s_ptr", "w1_ptr",
                                        "w2_ptr", "s1_ptr", "s2_ptr", "x_ptr")})
    dots = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[cfg["dots"]]
    consts = chunk.scan_constants(d=d, chunk=cfg["chunk"], tail=cfg["tail"], optimizer=cfg["optimizer"],
                                  ns_steps=5, has_counts=cfg["counts"], has_reads=cfg["reads"],
                                  dot_dtype=dots, precision=cfg["precision"])
    if kind == "scan1":
        return compile_one(chunk._scan1_kernel, types, consts, cfg["num_warps"], chunk.SCAN1_STAGES, arch)
    consts.update(chunk.wide_views(d, e), BLOCK_E=min(cfg["block_e"], e),
                  NS_BLOCK=min(cfg["ns_block"], max(d, e)))
    # num_stages=1: as the launch does (W and S are rewritten in place every chunk)
    return compile_one(chunk._scan2_kernel, types, consts, cfg["num_warps"], 1, arch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=DEFAULT_ARCH, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--all", action="store_true", help="also the fallback tunings and other modes")
    p.add_argument("--quick", action="store_true", help="only the default chunk kernels and the read")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    from atlas.kernels.chunk import NS_BLOCK_FALLBACK

    ok = True
    for kind, cfg in configurations(args.all, args.quick):
        try:
            res = check(kind, cfg, args.arch)
            # a whole-matrix Newton-Schulz that does not fit is fine: the launch's ladder falls back
            ok &= res["fits"] or (kind == "scan2" and cfg["ns_block"] > NS_BLOCK_FALLBACK)
        except Exception as exc:  # a configuration that does not compile is the finding
            res, ok = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}, False
        print(json.dumps({"kernel": kind, **cfg, **res}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
