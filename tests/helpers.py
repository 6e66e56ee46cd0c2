"""The tests' small models, the texts they read, and the comparison of session states."""

from __future__ import annotations

from pathlib import Path

import torch

from atlas.engine import Atlas, ModelConfig, save_checkpoint
from atlas.engine.state import is_cache_key
from bench import documents

#: Real texts beside the checkout on machines that have them (CI does; a fresh clone does not).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Texts that ship with the tests, so that every test also runs on a fresh clone.
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared_text(name: str) -> Path | None:
    """``name`` from the shared texts, if this machine has them."""
    path = SHARED_DATA / name
    return path if path.exists() else None


def tiny_config(**kw) -> ModelConfig:
    """Small enough for exhaustive streaming tests; c > 1 and a chunk that does not divide lengths."""
    base = dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, chunk_size=8, omega_window=3,
                swa_window=12, mem_expansion=2, eta_max=0.9)
    base.update(kw)
    return ModelConfig(**base)


def tiny_atlas(dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> Atlas:
    return Atlas.from_config(tiny_config(**kw), seed=seed, device="cpu", dtype=dtype)


#: A model that reads a few hundred thousand tokens a second on one CPU core: the server tests are
#: about the protocol, and a 5 MB document must go through in seconds.
FAST = dict(d_model=8, n_heads=1, n_layers=1, layers=["atlas"], omega_window=1, ns_steps=0, optimizer="gd",
            mem_depth=1, poly_degree=1, mem_expansion=1, chunk_size=4096, swa_window=4096)


def fast_atlas() -> Atlas:
    return tiny_atlas(torch.float32, **FAST)


def write_checkpoint(path: Path) -> Path:
    """The FAST model saved at ``path``, for servers started as processes."""
    return save_checkpoint(fast_atlas().model, path)


def document(nbytes: int) -> bytes:
    """ASCII text of exactly ``nbytes``: the shared Shakespeare repeated when present, else generated."""
    return documents.document(nbytes, shared_text("tinyshakespeare.txt"))


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


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of the engine's calls into the fused kernels ("step": chunk updates, "read": decode
    reads), through wrappers that still call them."""
    from atlas.engine.model import memory

    calls = {"step": 0, "read": 0}
    for name, key in (("chunk_update", "step"), ("memory_read", "read")):
        real = getattr(memory.kernels, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(memory.kernels, name, counted)
    return calls
