"""Weights in bf16 or fp16, state in fp32 (docs/model.md, "Precision"), and the model's size as the
server reports it: the start-up log, /v1/models, /metrics.

The bf16 and fp32 models of these tests hold the same weights: the fp32 model's weights rounded to
bf16, so only the activations' precision differs."""

from __future__ import annotations

import os
import re

import httpx
import pytest
import torch
from pydantic import ValidationError
from starlette.testclient import TestClient

from atlas.engine import Atlas, SamplingParams, save_checkpoint
from atlas.engine.model import AtlasModel
from atlas.engine.state import SessionState, is_cache_key
from atlas.kernels.settings import kernel_settings
from atlas.server.app import create_app
from atlas.server.settings import ServerSettings

from .helpers import count_kernel_calls, document, same_session, tiny_atlas, tiny_config
from .server_helpers import running_server

#: Norm-relative error ||l_bf16 - l_fp32|| / ||l_fp32|| of each token's logits, bound for the tiny MAG
#: model (tests/helpers.tiny_config) on the same weights. Measured: at most 7.1e-3 over 1,000 tokens
#: (125 chunks; seeds 0-3, mean 3.7e-3), about two bf16 epsilons (2^-8 = 3.9e-3) in the residual
#: stream, and flat over the chunks. docs/model.md, "Precision", states the same figures.
BF16_LOGITS_TOL = 1.5e-2
#: The same for fp16 (10 mantissa bits, not 7): measured at most 1.4e-3 (mean 5.3e-4).
FP16_LOGITS_TOL = 4e-3
#: The same for the fp32 model with its Newton-Schulz in bf16 (ATLAS_NS_PRECISION=bf16): measured at most
#: 9.3e-4 over 1,000 tokens (seeds 0-3, mean 2.5e-4), every next-token argmax unchanged.
NS_BF16_LOGITS_TOL = 4e-3
#: Greedy continuations: of 32 tokens after 1,000, at least this many equal (measured: all 32).
GREEDY_AGREE = 28

LOW = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]


def same_weights(dtype: torch.dtype, seed: int = 0, **kw) -> tuple[Atlas, Atlas]:
    """(fp32 model, `dtype` model) on the same weights: the tiny model's, rounded to `dtype`."""
    ref = tiny_atlas(torch.float32, seed=seed, **kw)
    weights = {k: v.to(dtype) for k, v in ref.model.state_dict().items()}
    out = []
    for dt in (torch.float32, dtype):
        model = AtlasModel(ref.config).to(dt)
        model.load_state_dict(weights)
        out.append(Atlas(model))
    return out[0], out[1]


def tokens(atlas: Atlas, n: int) -> list[int]:
    return atlas.encode(document(2 * n).decode())[:n]


def rel_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token: ||got - ref|| / ||ref|| over the vocabulary."""
    return (got.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_LOGITS_TOL), (torch.float16, FP16_LOGITS_TOL)],
                         ids=IDS)
def test_low_precision_logits_agree_with_fp32(dtype: torch.dtype, tol: float) -> None:
    a32, low = same_weights(dtype)
    ids = tokens(a32, 203)  # 25 chunks of 8, and 3 tokens of an unfinished one
    _, ref = a32.feed(a32.new_state(), ids, all_logits=True)
    _, got = low.feed(low.new_state(), ids, all_logits=True)
    assert got.dtype == torch.float32  # logits are kept in the state dtype
    err = rel_errors(got, ref)
    assert float(err.max()) < tol, err.max()
    # No drift over the chunks: the last chunks are no worse than twice the first ones.
    assert float(err[0, -48:].max()) < 2 * float(err[0, :48].max()) + 1e-3


def test_greedy_continuations_mostly_agree() -> None:
    a32, a16 = same_weights(torch.bfloat16)
    ids = tokens(a32, 1000)
    s32, l32 = a32.feed(a32.new_state(), ids, all_logits=True)
    s16, l16 = a16.feed(a16.new_state(), ids, all_logits=True)
    assert float((l16.argmax(-1) == l32.argmax(-1)).float().mean()) > 0.95  # next-token choices
    params = SamplingParams(max_tokens=32, temperature=0.0)
    g32 = [t.id for t in a32.generate(s32, None, params)]
    g16 = [t.id for t in a16.generate(s16, None, params)]
    assert sum(x == y for x, y in zip(g32, g16, strict=True)) >= GREEDY_AGREE, (g32, g16)


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_state_is_fp32_whatever_the_weights(dtype: torch.dtype) -> None:
    a32, low = same_weights(dtype)
    ids = tokens(a32, 45)
    s32, _ = a32.feed(a32.new_state(), ids)
    state, _ = low.feed(low.new_state(), ids)
    for k, v in state.tensors.items():
        if v.is_floating_point():
            # Saved tensors in fp32; the decode caches (never saved) in the activation dtype.
            assert v.dtype == (dtype if is_cache_key(k) else torch.float32), k
    data, data32 = low.save_state(state), a32.save_state(s32)
    assert len(data) == len(data32) == low.state_bytes == a32.state_bytes
    saved = SessionState.from_bytes(data).tensors
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == \
           {k: (v.dtype, v.shape) for k, v in SessionState.from_bytes(data32).tensors.items()}
    # Saved and restored, the low-precision session continues bit for bit.
    restored = low.load_state(data)
    assert restored.equal(state)
    more = tokens(a32, 80)[45:]
    s1, out1 = low.feed(state, more)
    s2, out2 = low.feed(restored, more)
    assert s1.equal(s2) and torch.equal(out1, out2)
    # One token: the unsaved session reads it from its decode cache, the restored one (whose cache
    # is empty) as a block; the layer states stay equal, the logits agree to the dtype's rounding.
    s1, out1 = low.feed(state, more[:1])
    s2, out2 = low.feed(restored, more[:1])
    for k, v in s1.tensors.items():
        if not is_cache_key(k) and k != "last_logits":
            assert torch.equal(v, s2.tensors[k]), k
    assert float(rel_errors(out2, out1).max()) < BF16_LOGITS_TOL


def test_size_properties() -> None:
    a32, a16 = same_weights(torch.bfloat16)
    n = sum(p.numel() for p in a32.model.parameters())
    assert a32.parameters == a16.parameters == n
    assert a32.weight_bytes == 4 * n and a16.weight_bytes == 2 * n
    assert a32.dtype_name == "float32" and a16.dtype_name == "bfloat16"
    assert a16.state_bytes == len(a16.save_state(a16.new_state())) == a32.state_bytes


def test_dtype_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().dtype == "float32"
    assert ServerSettings(dtype="bf16").dtype == "bfloat16"
    monkeypatch.setenv("ATLAS_DTYPE", "float16")
    assert ServerSettings().dtype == "float16"
    with pytest.raises(ValidationError):
        ServerSettings(dtype="int8")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def check_reports(models: dict, metrics: str, atlas: Atlas, dtype: str) -> None:
    """/v1/models and /metrics against the model's own numbers."""
    (card,) = models["data"]
    assert card["parameters"] == atlas.parameters and card["dtype"] == dtype
    assert card["weight_bytes"] == atlas.parameters * getattr(torch, dtype).itemsize
    assert card["state_bytes"] == atlas.state_bytes and card["vocab_size"] == atlas.config.vocab_size
    assert card["context"] == "unbounded"
    assert metric(metrics, "atlas:model_parameters") == atlas.parameters
    assert metric(metrics, "atlas:model_weight_bytes") == card["weight_bytes"]
    assert metric(metrics, "atlas:state_bytes") == atlas.state_bytes
    assert f'dtype="{dtype}"' in metrics and "atlas:model_info{" in metrics


def test_models_and_metrics_report_the_size(store) -> None:
    _, a16 = same_weights(torch.bfloat16)
    app = create_app(ServerSettings(), atlas=a16, store=store)
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        models = c.get("/v1/models").json()
        check_reports(models, c.get("/metrics").text, a16, "bfloat16")
        assert c.get(f"/v1/models/{models['data'][0]['id']}").json()["dtype"] == "bfloat16"


def test_serve_bfloat16_process(tmp_path) -> None:
    """`atlas serve --dtype bfloat16` as a process: it loads an fp32 checkpoint in bf16, logs and
    reports its size, and answers a completion."""
    ref = tiny_atlas(torch.float32)
    ckpt = save_checkpoint(ref.model, tmp_path / "tiny")
    with running_server(tmp_path / "work", {"ATLAS_MODEL": str(ckpt)}, args=["--dtype", "bfloat16"]) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            _, a16 = same_weights(torch.bfloat16)
            check_reports(c.get("/v1/models").json(), c.get("/metrics").text, a16, "bfloat16")
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "To be, or not", "max_tokens": 8,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
        log = srv.log()
    assert f"{a16.parameters:,} parameters in bfloat16" in log, log[-2000:]
    assert f"state {a16.state_bytes:,} bytes per session" in log


kernels_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not kernels_run, reason="the kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_kernels_take_low_precision_activations(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """With bf16 or fp16 weights the fused chunk step and decode read (fp32 state) give what the
    reference gives."""
    pytest.importorskip("triton")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    atlas = Atlas.from_config(tiny_config(n_layers=1), seed=0, device=device, dtype=dtype)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(5))
    calls = count_kernel_calls(monkeypatch)
    runs = []
    try:
        for mode in ("off", "on"):
            monkeypatch.setenv("ATLAS_KERNELS", mode)
            monkeypatch.setenv("ATLAS_KERNEL_PRECISION", "ieee")
            kernel_settings.cache_clear()
            state, logits = atlas.feed(atlas.new_state(batch=2), ids, all_logits=True)
            state, last = atlas.decode_step(state, [3, 4])
            runs.append((logits, last, state))
    finally:
        kernel_settings.cache_clear()
    assert calls == {"step": 2, "read": 1}
    (l0, d0, s0), (l1, d1, s1) = runs
    assert float(rel_errors(l1, l0).max()) < 1e-2 and float(rel_errors(d1, d0).max()) < 1e-2
    for k, v in s0.tensors.items():
        if v.is_floating_point() and not is_cache_key(k) and v.numel() and v.abs().max() > 0:
            assert s1.tensors[k].dtype == torch.float32
            assert float((s1.tensors[k] - v).norm() / v.norm()) < 1e-3, k


def test_bf16_newton_schulz_keeps_streams_exact_and_logits_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """ATLAS_NS_PRECISION=bf16 (docs/model.md, "Precision"): the fp32 model's memory steps run their
    Newton-Schulz in bf16. Every cut of a stream still takes the same path, so its state is
    bit-identical to the whole stream's; the logits move by bf16's rounding of the memory's updates
    (NS_BF16_LOGITS_TOL), without drift over the chunks."""
    atlas = tiny_atlas(torch.float32)
    ids = tokens(atlas, 1000)
    runs = {}
    try:
        for precision in ("fp32", "bf16"):
            monkeypatch.setenv("ATLAS_NS_PRECISION", precision)
            kernel_settings.cache_clear()
            whole_state, logits = atlas.feed(atlas.new_state(), ids, all_logits=True)
            state = atlas.new_state()
            for a, b in ((0, 5), (5, 333), (333, 334), (334, 1000)):
                state, _ = atlas.feed(state, ids[a:b])
            assert same_session(state, whole_state), precision
            runs[precision] = logits
    finally:
        kernel_settings.cache_clear()
    err = rel_errors(runs["bf16"], runs["fp32"])
    assert float(err.max()) > 0  # bf16 was used
    assert float(err.max()) < NS_BF16_LOGITS_TOL, err.max()
    assert float(err[0, -200:].max()) < 2 * float(err[0, :200].max()) + 1e-3


@pytest.mark.parametrize("units", [False, True, None], ids=["emulated", "native", "unknown"])
def test_server_warns_of_bf16_newton_schulz_without_bf16_units(store, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                units: bool | None) -> None:
    """On a CPU that would emulate bf16 (no AMX, no AVX512-BF16), ATLAS_NS_PRECISION=bf16 slows the
    memory down instead: the server says so when it starts, and only there."""
    import atlas.server.app as server_app

    monkeypatch.setattr(server_app, "has_bf16_matmul_units", lambda: units)
    monkeypatch.setenv("ATLAS_NS_PRECISION", "bf16")
    kernel_settings.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="atlas.server"):
            app = create_app(ServerSettings(), atlas=tiny_atlas(torch.float32), store=store)
            with TestClient(app, client=("127.0.0.1", 50000)) as c:
                assert c.get("/v1/models").status_code == 200
    finally:
        kernel_settings.cache_clear()
    warned = [r for r in caplog.records if "ATLAS_NS_PRECISION=bf16" in r.getMessage()]
    assert len(warned) == (1 if units is False else 0)
