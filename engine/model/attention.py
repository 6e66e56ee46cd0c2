"""Causal sliding-window attention with RoPE that stays exact at positions up to 1e9."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig

_QUERY_BLOCK = 512


def rope_cos_sin(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for integer positions pos (B, T). Angles are formed in float64 and reduced modulo
    2*pi before the cast, so a window at position 1e7 rotates exactly like one at position 0."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=pos.device) * 2 / head_dim)
    ang = torch.remainder(pos.to(torch.float64)[..., None] * inv_freq, 2 * math.pi)
    return ang.cos().to(dtype), ang.sin().to(dtype)


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
        c = self.cfg
        dev = self.qkv.weight.device
        return {
            "ring_k": torch.zeros(batch, c.n_heads, c.swa_window, c.head_dim, dtype=dtype, device=dev),
            "ring_v": torch.zeros(batch, c.n_heads, c.swa_window, c.head_dim, dtype=dtype, device=dev),
            "ring_pos": torch.full((batch, c.swa_window), -1, dtype=torch.int64, device=dev),
        }

    def forward(self, x: Tensor, st: dict[str, Tensor], start: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, D); start (B,) absolute position of the first new token. Returns (B, H, T, d)."""
        c = self.cfg
        bsz, t, _ = x.shape
        w = c.swa_window
        pos = start[:, None] + torch.arange(t, device=x.device)
        q, k, v = self.qkv(x).view(bsz, t, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_base, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = torch.cat([st["ring_k"], k], dim=2)
        vals = torch.cat([st["ring_v"], v], dim=2)
        kpos = torch.cat([st["ring_pos"], pos], dim=1)
        outs = []
        # New token i sits at index w + i of keys; its window is within [i, w + i].
        for s in range(0, t, _QUERY_BLOCK):
            e = min(t, s + _QUERY_BLOCK)
            qp, kp = pos[:, s:e, None], kpos[:, None, s:w + e]
            mask = (kp <= qp) & (kp > qp - w) & (kp >= 0)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, s:e], keys[:, :, s:w + e], vals[:, :, s:w + e], attn_mask=mask[:, None]))
        new = {"ring_k": keys[:, :, -w:], "ring_v": vals[:, :, -w:], "ring_pos": kpos[:, -w:]}
        out = torch.cat(outs, dim=2) if outs else q
        return out, new
