"""The decode-time read: M_W(x) for a few rows per session (decode: one), batched over sessions.

One program per (session, head, row). It is a pair of matrix-vector products, bound by reading W
(128 KB fp32 per head at d=64, e=256), so it streams W in e-blocks and reduces with broadcast sums
rather than tl.dot (whose tiles need 16 rows). The reference is the engine's `memory_read`
(engine/model/reference_step.py).

Launch shape: 8 warps and e-blocks of 32 rows. Compiled for sm_90 that is 80 registers per thread and no
spills, with every e-block's loads issued ahead of their use; 4 warps and blocks of 64 need 255
registers and spill (`python -m atlas.kernels.compile_check` reports both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atlas.engine.model.reference_step import Weights

from ._common import _gelu, next_pow2

READ_WARPS = 8
READ_BLOCK_E = 32


@triton.jit
def _read2_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, L, D: tl.constexpr, E: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (session, head)
    row = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    d_ok = offs_d < D
    x = tl.load(x_ptr + (pid * L + row) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = x
    w1_base, w2_base = w1_ptr + pid * D * E, w2_ptr + pid * D * E
    for e0 in tl.static_range(0, E, BLOCK_E):
        cols = e0 + offs_e
        ok = (cols < E)[:, None] & d_ok[None, :]
        # (BE, D) tiles: rows of W2, and columns of W1 seen transposed
        w2b = tl.load(w2_base + cols[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
        u = _gelu(tl.sum(w2b * x[None, :], axis=1))
        w1t = tl.load(w1_base + offs_d[None, :] * E + cols[:, None], mask=ok, other=0.0)
        y += tl.sum(w1t * u[:, None], axis=0)
    tl.store(out_ptr + (pid * L + row) * D + offs_d, y, mask=d_ok)


@triton.jit
def _read1_kernel(x_ptr, w_ptr, out_ptr, L, D: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(x_ptr + (pid * L + row) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    w_ok = d_ok[:, None] & d_ok[None, :]
    w = tl.load(w_ptr + pid * D * D + offs_d[:, None] * D + offs_d[None, :], mask=w_ok, other=0.0)
    tl.store(out_ptr + (pid * L + row) * D + offs_d, tl.sum(w * x[None, :], axis=1), mask=d_ok)


def memory_read(weights: Weights, x: Tensor, *, num_warps: int = READ_WARPS,
                block_e: int = READ_BLOCK_E) -> Tensor:
    """M_W(x) for x (B, H, L, d) and weights (B, H, ...) as in the engine; returns fp32 (B, H, L, d)."""
    bsz, h, n, d = x.shape
    x = x.contiguous()
    w = tuple(t.to(torch.float32).contiguous() for t in weights)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    grid = (bsz * h, n)
    if len(w) == 1:
        _read1_kernel[grid](x, w[0], out, n, D=d, BLOCK_D=next_pow2(d), num_warps=num_warps)
    else:
        e = w[0].shape[-1]
        _read2_kernel[grid](x, w[0], w[1], out, n, D=d, E=e, BLOCK_D=next_pow2(d),
                            BLOCK_E=min(block_e, next_pow2(e)), num_warps=num_warps)
    return out
