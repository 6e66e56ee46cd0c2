"""Causal sliding-window attention with RoPE that stays exact at positions up to 1e9."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .memory import state_dtype


def rope_cos_sin(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for integer positions pos (B, T). Angles are formed in float64 and reduced modulo
    2*pi before the cast, so a window at position 1e7 rotates exactly like one at position 0."""
    inv_freq = _inv_freq(head_dim, base, pos.device)
    ang = torch.remainder(pos.to(torch.float64)[..., None] * inv_freq, 2 * math.pi)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, base: float, device: torch.device) -> Tensor:
    """The rotation frequencies (float64), made once per shape and device rather than per call."""
    half = head_dim // 2
    return base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / head_dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d); cos/sin (B, T, d/2); rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SlidingWindowAttention(nn.Module):
    """Each token attends to itself and the w-1 tokens before it. The state is a ring of the last
    w keys (rotated) and values with their absolute positions (-1 marks an empty slot)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)

    def init_state(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Fresh state; `dtype` is the activation dtype. The ring is saved, so it is in the state
        dtype (at least fp32: it holds activations exactly, and a state file is fp32 whatever the
        weights' dtype); the decode caches are in the activation dtype."""
        c = self.cfg
        dev = self.qkv.weight.device
        sdtype = state_dtype(dtype)
        return {
            "ring_k": torch.zeros(batch, c.n_heads, c.swa_window, c.head_dim, dtype=sdtype, device=dev),
            "ring_v": torch.zeros(batch, c.n_heads, c.swa_window, c.head_dim, dtype=sdtype, device=dev),
            "ring_pos": torch.full((batch, c.swa_window), -1, dtype=torch.int64, device=dev),
            "cache_k": torch.zeros(batch, c.n_heads, c.chunk_size, c.head_dim, dtype=dtype, device=dev),
            "cache_v": torch.zeros(batch, c.n_heads, c.chunk_size, c.head_dim, dtype=dtype, device=dev),
        }

    def forward(self, x: Tensor, st: dict[str, Tensor], pos: Tensor,
                commit: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One chunk block: x (B, L, D) at absolute positions pos (B, L). Sessions in `commit` take
        the block into their ring. Returns (B, H, L, d).

        A span of n >= 2 whole chunks that every session commits (L = n b) is projected at once and
        attended chunk by chunk, each chunk as it would be as a block of its own."""
        c, b = self.cfg, self.cfg.chunk_size
        bsz, t, _ = x.shape
        n_chunks = t // b if t > b else 1
        if n_chunks > 1 and (t != n_chunks * b or not bool(commit.all())):
            raise ValueError("a span of several chunks must be whole chunks that every session commits")
        qkv = self.qkv(x)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_base, x.dtype)
        outs = []
        for j in range(n_chunks):
            sl = slice(j * b, (j + 1) * b) if n_chunks > 1 else slice(None)
            out, st = self._chunk(qkv[:, sl], cos[:, sl], sin[:, sl], st, pos[:, sl], commit)
            outs.append(out)
        return (outs[0] if n_chunks == 1 else torch.cat(outs, dim=2)), st

    def _chunk(self, qkv: Tensor, cos: Tensor, sin: Tensor, st: dict[str, Tensor], pos: Tensor,
               commit: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        bsz, t, _ = qkv.shape
        w = c.swa_window
        q, k, v = qkv.view(bsz, t, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # The ring holds earlier keys and values exactly: the cast back is lossless.
        keys = torch.cat([st["ring_k"].to(k.dtype), k], dim=2)
        vals = torch.cat([st["ring_v"].to(v.dtype), v], dim=2)
        kpos = torch.cat([st["ring_pos"], pos], dim=1)
        qp, kp = pos[:, :, None], kpos[:, None, :]
        mask = (kp <= qp) & (kp > qp - w) & (kp >= 0)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None])
        pad = (0, 0, 0, c.chunk_size - t)
        cache = {"cache_k": F.pad(k, pad), "cache_v": F.pad(v, pad)}
        if not bool(commit.any()):
            return out, dict(st, **cache)
        m = commit.view(bsz, 1, 1, 1)
        ring = st["ring_k"].dtype
        new = {"ring_k": torch.where(m, keys[:, :, t:].to(ring), st["ring_k"]),
               "ring_v": torch.where(m, vals[:, :, t:].to(ring), st["ring_v"]),
               "ring_pos": torch.where(commit[:, None], kpos[:, t:], st["ring_pos"])}
        return out, dict(new, **cache)

    def decode(self, x: Tensor, st: dict[str, Tensor], pos: Tensor, filled: Tensor,
               rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One new token per session at positions pos (B,), attending to the ring, the cached keys
        of its unfinished chunk (`filled` of them) and itself. `rope`: rope_cos_sin(pos[:, None]),
        when the caller computed it once for every layer."""
        c = self.cfg
        bsz = x.shape[0]
        q, k, v = self.qkv(x).view(bsz, 1, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope or rope_cos_sin(pos[:, None], c.head_dim, c.rope_base, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Scores against the ring, the chunk's cached keys and itself, without copying the ring.
        ar = torch.arange(c.chunk_size, device=x.device)
        cpos = torch.where(ar[None] < filled[:, None], (pos - filled)[:, None] + ar[None], -1)
        kp = torch.cat([st["ring_pos"], cpos, pos[:, None]], dim=1)[:, None, None, :]
        qp = pos[:, None, None, None]
        mask = (kp <= qp) & (kp > qp - c.swa_window) & (kp >= 0)
        ring_k, ring_v = st["ring_k"].to(q.dtype), st["ring_v"].to(v.dtype)
        scores = torch.cat([q @ ring_k.mT, q @ st["cache_k"].mT, (q * k).sum(-1, keepdim=True)], dim=-1)
        p = torch.softmax((scores / math.sqrt(c.head_dim)).masked_fill(~mask, float("-inf")), dim=-1)
        w, b = c.swa_window, c.chunk_size
        out = p[..., :w] @ ring_v + p[..., w:w + b] @ st["cache_v"] + p[..., w + b:] * v
        at = filled.view(bsz, 1, 1, 1).expand(-1, c.n_heads, 1, c.head_dim)
        return out, {"cache_k": st["cache_k"].scatter(2, at, k), "cache_v": st["cache_v"].scatter(2, at, v)}
