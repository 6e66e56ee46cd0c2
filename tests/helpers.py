"""Shared helpers for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from atlas.engine import Atlas, ModelConfig
from atlas.engine.state import is_cache_key

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(**kw) -> ModelConfig:
    """Small enough for exhaustive streaming tests; c > 1 and a chunk that does not divide lengths."""
    base = dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, chunk_size=8, omega_window=3,
                swa_window=12, mem_expansion=2, eta_max=0.9)
    base.update(kw)
    return ModelConfig(**base)


def tiny_atlas(dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> Atlas:
    return Atlas.from_config(tiny_config(**kw), seed=seed, device="cpu", dtype=dtype)


def same_session(got, ref) -> bool:
    """The recurrent state bit-exact; the last logits (of a partial chunk, whose block shape
    depends on what it was batched with) within fp32 rounding."""
    if got.tensors.keys() != ref.tensors.keys() or got.fingerprint != ref.fingerprint:
        return False
    for k, v in ref.tensors.items():
        w = got.tensors[k]
        if is_cache_key(k):
            continue
        if k == "last_logits":
            if not torch.allclose(w, v, rtol=1e-5, atol=1e-6):
                return False
        elif not torch.equal(w, v):
            return False
    return True
