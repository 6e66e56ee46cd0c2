"""The fused Triton kernels (kernels/) against the engine's reference chunk step.

Without CUDA the kernels run in Triton's interpreter on CPU, in fp32 and fp16 (the interpreter has no
bf16 dots), at small shapes; with CUDA the same tests run compiled, and the `gpu` tests add the real
shapes (d=64, e=256, b=64, c=8) in bf16 and fp32. Errors are relative RMSEs against a float64
reference fed the same (rounded) inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from atlas.engine import Atlas
from atlas.engine.model.reference_step import chunk_scan_reference, chunk_update, memory_read
from atlas.kernels.settings import kernel_settings

from .helpers import count_kernel_calls, tiny_config

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads it when the kernels are decorated (imported below) and again while interpreting,
    # so it stays set for the rest of the session; nothing else here compiles Triton code on CPU.
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")
from atlas.kernels import chunk as kchunk  # noqa: E402
from atlas.kernels import read as kread  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
F64 = torch.float64
OPTIMIZERS = ("gd", "momentum", "muon")
gpu = pytest.mark.skipif(INTERPRETED, reason="needs CUDA (compiled Triton)")


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch):
    """Sets ATLAS_KERNEL* variables for one test; the settings are re-read after each change."""

    def set_env(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        kernel_settings.cache_clear()

    yield set_env
    kernel_settings.cache_clear()  # before monkeypatch restores the environment; re-read lazily


def rel_rmse(got: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return float((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def make_case(depth: int, optimizer: str, *, batch: int = 2, heads: int = 2, d: int = 16, e: int = 32,
              chunk: int = 16, window: int = 3, length: int = 40, seed: int = 0,
              device: str = DEVICE) -> dict:
    """float64 inputs like the model's: unit-norm phi(q), phi(k); gates in (0, 1); a carried state."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=F64) * scale
    ru = lambda *s, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=F64)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
    nc, tail = max(1, length // chunk), window - 1
    case = dict(q=unit(rn(batch, heads, length, d)), k=unit(rn(batch, heads, length, d)),
                v=rn(batch, heads, length, d), gamma=ru(batch, heads, length),
                eta=ru(batch, heads, nc, hi=0.5), alpha=ru(batch, heads, nc, lo=0.9),
                theta=ru(batch, heads, nc))
    if depth == 2:
        w = {"W1": rn(batch, heads, d, e, scale=e**-0.5), "W2": rn(batch, heads, e, d, scale=d**-0.5)}
    else:
        w = {"W": rn(batch, heads, d, d, scale=d**-0.5)}
    state = dict(w, tail_k=unit(rn(batch, heads, tail, d)), tail_v=rn(batch, heads, tail, d),
                 tail_gamma=ru(batch, heads, tail))
    if optimizer != "gd":
        state.update({"S" + n[1:]: rn(*x.shape, scale=0.05) for n, x in w.items()})
    case["state"] = state
    return {k: (v.to(device) if isinstance(v, Tensor) else {n: x.to(device) for n, x in v.items()})
            for k, v in case.items()}


def rounded(case: dict, dtype: torch.dtype) -> dict:
    """The inputs as the kernel gets them (activations in dtype, state fp32) and, in float64, exactly
    those values for the reference."""
    act = {k: case[k].to(dtype) for k in ("q", "k", "v", "gamma")}
    act.update({k: case[k].float() for k in ("eta", "alpha", "theta")})
    st = {n: (x.float() if n[0] in "WS" else x.to(dtype)) for n, x in case["state"].items()}
    return dict(act, state=st)


def names(state: dict) -> tuple[str, ...]:
    return ("W",) if "W" in state else ("W1", "W2")


def run_kernel(inp: dict, *, chunk: int, optimizer: str, ns_steps: int = 5, **kw) -> tuple[Tensor, dict]:
    st = inp["state"]
    ns = names(st)
    weights = tuple(st[n] for n in ns)
    momentum = tuple(st["S" + n[1:]] for n in ns) if optimizer != "gd" else ()
    reads, w, s, (tk, tv, tg) = kchunk.chunk_scan(
        inp["q"], inp["k"], inp["v"], inp["gamma"], inp["eta"], inp["alpha"], inp["theta"], weights,
        momentum, st["tail_k"], st["tail_v"], st["tail_gamma"], chunk_size=chunk, optimizer=optimizer,
        ns_steps=ns_steps, **kw)
    new = dict(zip(ns, w, strict=True), tail_k=tk, tail_v=tv, tail_gamma=tg)
    new.update({"S" + n[1:]: x for n, x in zip(ns, s, strict=False)})
    return reads, new


def run_reference(inp: dict, *, chunk: int, optimizer: str, ns_steps: int = 5) -> tuple[Tensor, dict]:
    f = {k: v.to(F64) for k, v in inp.items() if k != "state"}
    st = {n: x.to(F64) for n, x in inp["state"].items()}
    return chunk_scan_reference(f["q"], f["k"], f["v"], f["gamma"], f["eta"], f["alpha"], f["theta"], st,
                                chunk, optimizer, ns_steps)


def errors(got: tuple[Tensor, dict], ref: tuple[Tensor, dict]) -> dict[str, float]:
    assert got[1].keys() == ref[1].keys()
    assert got[0].shape == ref[0].shape
    out = {"reads": rel_rmse(got[0], ref[0])}
    out.update({n: rel_rmse(got[1][n], ref[1][n]) for n in ref[1] if ref[1][n].numel()})
    return out


def check(errs: dict[str, float], tol: dict[str, float]) -> None:
    bad = {k: v for k, v in errs.items() if v > tol.get(k, tol.get("state", tol["reads"]))}
    assert not bad, f"relative RMSE over tolerance {tol}: {errs}"


# ---------------------------------------------------------------------------------------------
# Small shapes (interpreter on CPU, compiled on CUDA)
# ---------------------------------------------------------------------------------------------

# fp16 reads are stored in fp16 (2^-11 relative); the state stays fp32 throughout.
TOL = {torch.float32: {"reads": 1e-5, "state": 1e-5}, torch.float16: {"reads": 1e-3, "state": 1e-5}}
TF32 = {"reads": 1e-2, "state": 1e-2}  # compiled fp32 dots default to tf32 (10-bit mantissa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_chunk_scan_matches_reference(depth: int, optimizer: str, dtype: torch.dtype) -> None:
    inp = rounded(make_case(depth, optimizer), dtype)  # T = 40: two chunks of 16 and a partial one
    got = run_kernel(inp, chunk=16, optimizer=optimizer, precision="ieee")
    assert got[0].dtype == dtype and all(got[1][n].dtype == torch.float32 for n in names(got[1]))
    check(errors(got, run_reference(inp, chunk=16, optimizer=optimizer)), TOL[dtype])
    if not INTERPRETED:  # the default fp32 dot mode on a GPU
        got = run_kernel(inp, chunk=16, optimizer=optimizer)
        check(errors(got, run_reference(inp, chunk=16, optimizer=optimizer)), TF32)


@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_low_precision_dots(depth: int) -> None:
    # The read and gradient products with fp16 operands (fp32 accumulation); Newton-Schulz in fp32.
    inp = rounded(make_case(depth, "muon"), torch.float16)
    got = run_kernel(inp, chunk=16, optimizer="muon", low_precision_dots=True, precision="ieee")
    check(errors(got, run_reference(inp, chunk=16, optimizer="muon")), {"reads": 5e-3, "state": 5e-3})


@pytest.mark.parametrize("ns_steps", [5, 0])
@pytest.mark.parametrize("d,e", [(16, 64), (32, 16)])
def test_kernel_blocked_newton_schulz(d: int, e: int, ns_steps: int) -> None:
    # Newton-Schulz in column blocks through a scratch (what the launch falls back to when the whole
    # iterate does not fit on chip) computes the same.
    inp = rounded(make_case(2, "muon", d=d, e=e, seed=4), torch.float32)
    got = run_kernel(inp, chunk=16, optimizer="muon", ns_steps=ns_steps, ns_block=16, precision="ieee")
    check(errors(got, run_reference(inp, chunk=16, optimizer="muon", ns_steps=ns_steps)), TOL[torch.float32])


@pytest.mark.parametrize("depth,d,e,ns_block", [(1, 16, 16, None), (2, 16, 64, None), (2, 16, 64, 16),
                                                (2, 32, 16, 16)], ids=["depth1", "whole", "blocked", "tall"])
@pytest.mark.parametrize("ns_steps", [5, 2])
def test_kernel_newton_schulz_gram_form(depth: int, d: int, e: int, ns_block: int | None,
                                        ns_steps: int) -> None:
    # The reference's Gram form of Newton-Schulz (restarts every NS_RESTART steps; 2 steps: one
    # block, shorter than NS_RESTART), in registers and in column blocks, as a tuning of the kernel.
    inp = rounded(make_case(depth, "muon", d=d, e=e, seed=6), torch.float32)
    got = run_kernel(inp, chunk=16, optimizer="muon", ns_steps=ns_steps, ns_block=ns_block, ns_gram=True,
                     precision="ieee")
    check(errors(got, run_reference(inp, chunk=16, optimizer="muon", ns_steps=ns_steps)), TOL[torch.float32])


def test_kernel_falls_back_to_a_tuning_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the whole Newton-Schulz iterate does not fit (OutOfResources at launch), the launch takes
    the next tuning of its ladder and remembers it."""
    from triton.runtime.errors import OutOfResources

    real, tried = kchunk._scan2_kernel, []

    class Tight:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["NS_BLOCK"], kw["BLOCK_E"]))
                if kw["NS_BLOCK"] == kw["C"]:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                return real[grid](*args, **kw)
            return launch

    from atlas import kernels

    monkeypatch.setattr(kchunk, "_scan2_kernel", Tight())
    monkeypatch.setattr(kchunk, "_FITTED", {})
    monkeypatch.setattr(kernels, "_UNFIT", set())
    inp = rounded(make_case(2, "muon", e=128), torch.float32)
    for _ in range(2):
        got = run_kernel(inp, chunk=16, optimizer="muon", precision="ieee")
    assert tried == [(128, 64), (64, 64), (64, 64)]
    check(errors(got, run_reference(inp, chunk=16, optimizer="muon")), TOL[torch.float32])


def test_kernel_engine_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch, kernel_env) -> None:
    from atlas import kernels
    from atlas.engine.model import memory

    def no_fit(*args, **kwargs):
        raise kernels.KernelResourceError("does not fit")

    kernel_env("ATLAS_KERNELS", "on")
    monkeypatch.setattr(kernels, "chunk_update", no_fit)
    atlas = Atlas.from_config(tiny_config(n_layers=1), seed=0, device=DEVICE, dtype=torch.float32)
    tokens = torch.randint(0, 64, (1, 17), generator=torch.Generator().manual_seed(2))
    _, got = atlas.feed(atlas.new_state(), tokens, all_logits=True)
    kernel_env("ATLAS_KERNELS", "off")
    _, ref = atlas.feed(atlas.new_state(), tokens, all_logits=True)
    assert torch.equal(got, ref)
    assert memory.use_kernels((torch.zeros(1, 1, 16, 16, device=DEVICE),)) is False  # off


SHAPES = [
    # (length, chunk, window, d, e): chunks not a power of two, c = 1, c - 1 > b, T < b, T = k b, e < d
    pytest.param(48, 16, 3, 16, 32, id="whole-chunks"),
    pytest.param(11, 16, 3, 16, 32, id="partial-only"),
    pytest.param(0, 16, 3, 16, 32, id="empty"),
    pytest.param(37, 12, 5, 16, 32, id="chunk-12"),
    pytest.param(29, 8, 1, 16, 16, id="no-tail"),
    pytest.param(23, 4, 7, 16, 32, id="tail-over-chunks"),
    pytest.param(33, 16, 4, 32, 16, id="e-below-d"),
]


@pytest.mark.parametrize("length,chunk,window,d,e", SHAPES)
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_shapes(depth: int, length: int, chunk: int, window: int, d: int, e: int) -> None:
    inp = rounded(make_case(depth, "muon", length=length, chunk=chunk, window=window, d=d, e=e, heads=1,
                            batch=1, seed=3), torch.float32)
    got = run_kernel(inp, chunk=chunk, optimizer="muon", precision="ieee")
    check(errors(got, run_reference(inp, chunk=chunk, optimizer="muon")), TOL[torch.float32])


def test_kernel_chunk_scan_in_pieces() -> None:
    """Scanning a stream in pieces (cut on chunk boundaries, the state carried) equals one scan."""
    inp = rounded(make_case(2, "muon", length=64, chunk=8, batch=1, heads=2), torch.float32)
    whole = run_kernel(inp, chunk=8, optimizer="muon", precision="ieee")
    state, reads = inp["state"], []
    for a, b in ((0, 24), (24, 32), (32, 64)):
        piece = {k: inp[k][:, :, a:b] for k in ("q", "k", "v", "gamma")}
        piece.update({k: inp[k][:, :, a // 8:] for k in ("eta", "alpha", "theta")})
        r, state = run_kernel(dict(piece, state=state), chunk=8, optimizer="muon", precision="ieee")
        reads.append(r)
    check(errors((torch.cat(reads, 2), state), whole), {"reads": 1e-6, "state": 1e-6})


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_chunk_update_matches_reference(depth: int, optimizer: str) -> None:
    """The engine's one-chunk step (keys with their tail, Omega weights given), fused."""
    case = make_case(depth, optimizer, length=19, chunk=19, window=1)  # N = 19 rows, padded to 32
    st = case["state"]
    ns = names(st)
    weights = tuple(st[n].float() for n in ns)
    momentum = tuple(st["S" + n[1:]].float() for n in ns) if optimizer != "gd" else ()
    x, v, omega = case["k"].float(), case["v"].float(), 3 * case["gamma"].float()
    gates = [case[n][..., 0].float() for n in ("eta", "alpha", "theta")]
    w, s = kchunk.chunk_update(weights, momentum, x, v, omega, *gates, optimizer, 5, precision="ieee")
    f = lambda ts: tuple(t.double() for t in ts)
    rw, rs = chunk_update(f(weights), f(momentum), x.double(), v.double(), omega.double(), *f(gates),
                          optimizer, 5)
    assert len(w) == len(rw) and len(s) == len(rs)
    for a, b in zip((*w, *s), (*rw, *rs), strict=True):
        assert rel_rmse(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_memory_read(depth: int, rows: int, dtype: torch.dtype) -> None:
    case = make_case(depth, "gd", length=rows, d=24, e=40, batch=3)  # the read kernel masks any d, e
    weights = tuple(case["state"][n].float() for n in names(case["state"]))
    x = case["q"].to(dtype)
    got = kread.memory_read(weights, x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel_rmse(got, memory_read(tuple(w.double() for w in weights), x.double())) < 1e-5


def test_kernel_compiles_for_hopper() -> None:
    """The kernels compile for sm_90 (H100/H200) and fit its shared memory: Triton compiles on the host,
    so this runs without a GPU (in a fresh process: the interpreter does not compile). Depth 1 with
    each optimizer: pipelined, its gd and momentum loops asked for 241 KB, found on an H200."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "atlas.kernels.compile_check", "--arch", "90", "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count('"fits": true') == 5, out.stdout


def test_kernel_benchmark_runs(tmp_path) -> None:
    """bench/kernels.py end to end at a small shape (in the interpreter without CUDA): every column it
    can fill here is filled, the sweep's tunings all run, the kernel's reads match the reference's,
    and the JSON says what ran."""
    import json
    from pathlib import Path

    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "kernels.py"),
           "--device", DEVICE, "--batches", "1", "--lengths", "40", "--heads", "2", "--head-dim", "16",
           "--chunk", "16", "--window", "3", "--ref-chunks", "2", "--reps", "1", "--no-fla",
           "--compile-backend", "eager", "--sweep", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["config"]["compile"]["backend"] == "eager"
    (row,) = result["results"]
    assert (row["batch"], row["length"], row["tokens"], row["programs"]) == (1, 40, 40, 2)
    assert row["kernel"]["tokens_per_s"] > 0 and row["kernel_bf16_dots"]["tokens_per_s"] > 0
    assert row["eager"]["chunks_timed"] == 2 and "compiled_error" not in row
    assert row["compiled"]["seconds"] > 0
    assert row["kernel_vs_eager_reads_rel_rmse"] < 2e-2  # 16-bit reads (bf16 on CUDA), tf32 products
    assert row["ratios"]["kernel_vs_eager"] > 0 and row["ratios"]["kernel_vs_fla"] is None
    assert row["fla"] == {"skipped": "skipped (--no-fla)"}
    assert len(row["sweep"]) == 8 and all("error" not in s for s in row["sweep"]), row["sweep"]
    assert "B=  1 T=    40" in run.stdout
    (read,) = result["decode_read"]
    assert read["batch"] == 1 and read["bytes_of_weights"] == 2 * 2 * 16 * 64 * 4
    assert read["rel_rmse"] < 1e-5 and read["kernel"]["seconds"] > 0 and read["eager"]["gb_per_s"] > 0


@pytest.mark.parametrize("optimizer,depth", [("muon", 2), ("momentum", 1), ("gd", 2)])
def test_kernel_engine_dispatch(monkeypatch: pytest.MonkeyPatch, kernel_env, optimizer: str,
                                depth: int) -> None:
    """The engine with ATLAS_KERNELS=on (chunk steps and decode reads by the kernels) against =off."""

    kernel_env("ATLAS_KERNEL_PRECISION", "ieee")  # tf32 is measured by the real-shape tests
    cfg = tiny_config(optimizer=optimizer, mem_depth=depth, layers=["mag"], n_layers=1)
    atlas = Atlas.from_config(cfg, seed=0, device=DEVICE, dtype=torch.float32)
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(5))
    runs = []
    calls = count_kernel_calls(monkeypatch)
    for mode in ("off", "on"):
        kernel_env("ATLAS_KERNELS", mode)
        state, logits = atlas.feed(atlas.new_state(batch=2), tokens, all_logits=True)
        state, last = atlas.decode_step(state, [3, 4])
        runs.append((logits, last, state))
    assert calls["step"] == 2 and calls["read"] == 1  # two committed chunks, one decode read, when on
    (l0, d0, s0), (l1, d1, s1) = runs
    assert rel_rmse(l1, l0) < 1e-4 and rel_rmse(d1, d0) < 1e-4
    for k, v in s0.tensors.items():
        if v.is_floating_point() and v.numel() and v.abs().max() > 0:
            assert rel_rmse(s1.tensors[k], v) < 1e-4, k


def test_kernel_dispatch_keeps_autograd_on_the_reference(monkeypatch: pytest.MonkeyPatch, kernel_env) -> None:
    from atlas.engine.model import memory

    kernel_env("ATLAS_KERNELS", "on")
    w = torch.zeros(1, 1, 16, 16, device=DEVICE)
    assert memory.use_kernels((w,))
    assert not memory.use_kernels((w.requires_grad_(True),))
    assert not memory.use_kernels((torch.zeros(1, 1, 16, 16, dtype=F64, device=DEVICE),))
    assert not memory.use_kernels((torch.zeros(1, 1, 12, 12, device=DEVICE),))
    kernel_env("ATLAS_KERNELS", "off")
    assert not memory.use_kernels((torch.zeros(1, 1, 16, 16, device=DEVICE),))


# ---------------------------------------------------------------------------------------------
# Real shapes on a GPU
# ---------------------------------------------------------------------------------------------

REAL = dict(d=64, e=256, chunk=64, window=8, heads=16, batch=2, length=64 * 6 + 23)
# bf16 reads carry bf16 rounding (2^-9); tf32 products carry 2^-11 per operand.
GPU_TOL = {
    (torch.float32, "ieee"): {"reads": 1e-5, "state": 1e-4},
    (torch.float32, "tf32"): {"reads": 1e-2, "state": 3e-2},
    (torch.bfloat16, "tf32"): {"reads": 1.5e-2, "state": 3e-2},
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,precision", list(GPU_TOL), ids=["fp32-ieee", "fp32-tf32", "bf16-tf32"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_gpu_real_shapes(depth: int, optimizer: str, dtype: torch.dtype, precision: str) -> None:
    inp = rounded(make_case(depth, optimizer, **REAL), dtype)
    got = run_kernel(inp, chunk=REAL["chunk"], optimizer=optimizer, precision=precision)
    errs = errors(got, run_reference(inp, chunk=REAL["chunk"], optimizer=optimizer))
    print(f"depth {depth} {optimizer} {dtype} {precision}: {errs}")
    check(errs, GPU_TOL[(dtype, precision)])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ns_block,block_e,num_warps,ns_gram",
                         [(64, 64, 8, False), (256, 32, 8, False), (256, 64, 4, False), (256, 64, 16, False),
                          (64, 128, 8, False), (256, 64, 8, True), (64, 64, 8, True)])
def test_kernel_gpu_tunings(ns_block: int, block_e: int, num_warps: int, ns_gram: bool) -> None:
    inp = rounded(make_case(2, "muon", **REAL), torch.float32)
    got = run_kernel(inp, chunk=REAL["chunk"], optimizer="muon", precision="ieee", ns_block=ns_block,
                     block_e=block_e, num_warps=num_warps, ns_gram=ns_gram)
    ref = run_reference(inp, chunk=REAL["chunk"], optimizer="muon")
    check(errors(got, ref), GPU_TOL[(torch.float32, "ieee")])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ns_block", [256, 64], ids=["ns-whole", "ns-blocked"])
def test_kernel_gpu_repeatable(ns_block: int) -> None:
    """The same inputs twice give bit-identical reads and state, with more programs than the GPU has
    multiprocessors (several waves): a missing barrier between the phases that rewrite W and S in
    place shows up as a difference between runs, which the reference comparison can miss."""
    case = dict(REAL, batch=12, length=64 * 8 + 5)  # 192 programs
    inp = rounded(make_case(2, "muon", **case, seed=7), torch.bfloat16)
    first = run_kernel(inp, chunk=REAL["chunk"], optimizer="muon", ns_block=ns_block)
    second = run_kernel(inp, chunk=REAL["chunk"], optimizer="muon", ns_block=ns_block)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])
    assert torch.isfinite(first[0]).all()
    ref = run_reference(inp, chunk=REAL["chunk"], optimizer="muon")
    check(errors(first, ref), GPU_TOL[(torch.bfloat16, "tf32")])


@pytest.mark.gpu
@gpu
def test_kernel_gpu_low_precision_dots_bf16() -> None:
    inp = rounded(make_case(2, "muon", **REAL), torch.bfloat16)
    got = run_kernel(inp, chunk=REAL["chunk"], optimizer="muon", low_precision_dots=True)
    errs = errors(got, run_reference(inp, chunk=REAL["chunk"], optimizer="muon"))
    print(f"bf16 dots: {errs}")
    check(errs, {"reads": 3e-2, "state": 5e-2})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_gpu_memory_read(dtype: torch.dtype) -> None:
    case = make_case(2, "gd", d=64, e=256, heads=16, batch=32, length=1)
    weights = tuple(case["state"][n].float() for n in ("W1", "W2"))
    x = case["q"].to(dtype)
    got = kread.memory_read(weights, x)
    assert rel_rmse(got, memory_read(tuple(w.double() for w in weights), x.double())) < 1e-5


def test_kernel_settings_reject_unknown_values(kernel_env) -> None:
    from pydantic import ValidationError

    kernel_env("ATLAS_KERNELS", "sometimes")
    with pytest.raises(ValidationError, match="kernels"):
        kernel_settings()
    kernel_env("ATLAS_KERNELS", "off")
    kernel_env("ATLAS_KERNEL_PRECISION", "fp8")
    with pytest.raises(ValidationError, match="kernel_precision"):
        kernel_settings()
    kernel_env("ATLAS_KERNEL_PRECISION", "tf32")
    kernel_env("ATLAS_NS_PRECISION", "fp16")
    with pytest.raises(ValidationError, match="ns_precision"):
        kernel_settings()


@pytest.mark.gpu
@gpu
def test_kernel_gpu_bundled_model_answers_alike(monkeypatch: pytest.MonkeyPatch, kernel_env) -> None:
    """The bundled model (a depth-1 memory with Muon) served on CUDA: the same keys in its greedy
    answers to pass keys 2,000 tokens back with the fused kernels at their default precision as with
    the reference (the bytes after a key's full stop are uncertain, and tf32 may tip them), and the
    kernels took the chunk steps. The first H200 run found the depth-1 kernel faulting."""
    import random
    import re

    from atlas.engine.sampling import SamplingParams
    from atlas.training.tasks import passkey

    atlas = Atlas.load(device="cuda")
    samples = [passkey(random.Random(seed), 4096, depth=0.5) for seed in range(4)]
    calls = count_kernel_calls(monkeypatch)
    answers = {}
    for mode in ("off", "on"):
        kernel_env("ATLAS_KERNELS", mode)
        texts = []
        for s in samples:
            gen = atlas.generate(atlas.new_state(), s.prompt, SamplingParams(max_tokens=8, temperature=0))
            for _ in gen:
                pass
            texts.append(gen.text)
        answers[mode] = texts
    assert calls["step"] > 0
    keys = {mode: [re.findall(r"\d+", a)[:1] for a in texts] for mode, texts in answers.items()}
    assert keys["on"] == keys["off"], answers
    assert sum(s.value in a for s, a in zip(samples, answers["on"], strict=True)) >= 3, answers
