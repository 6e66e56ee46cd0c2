"""The fused ATLAS chunk recurrence: one Triton program per (session, head) loops over the chunks.

Per chunk j it computes, all at the chunk-start weights W_{j-1} (docs/model.md, "One ATLAS memory layer"):
the reads M(phi(q_t)) of the chunk's tokens, the Omega weights of the c-1 tail tokens and the chunk's
b tokens (gamma * multiplicity), the analytic gradients, the momentum, Newton-Schulz and the update.
A trailing partial chunk (T not a multiple of b) is read at the final weights and not committed.

Inputs are phi(q), phi(k), v (B, H, T, d) in fp32/fp16/bf16, gamma (B, H, T), the chunk gates
eta (already times eta_max), alpha, theta (B, H, >= T // b), and the carried state. Projections,
convolution, normalisation, phi, the gate sigmoids and the per-head RMS norm of the reads stay in
PyTorch. The reference is the engine's `chunk_scan_reference` (engine/model/reference_step.py).

On-chip budget (see README.md): depth 1 keeps W and S (d x d fp32) in registers across the loop.
Depth 2 (W1 d x e, W2 e x d, S1, S2: 256 KB fp32 per (session, head) at d=64, e=256) cannot stay on
one SM, so they live in a private fp32 copy in global memory (L2-resident) that each chunk streams
through in e-blocks; only Newton-Schulz holds a whole (min(d,e) x max(d,e)) matrix in registers.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from atlas.engine.model.reference_step import Weights, ns_scale

from . import MIN_TILE, KernelResourceError, is_tile, supported, unfit
from ._common import (
    NS_EPS,
    NS_N1,
    NS_N2,
    NS_N3,
    NS_RESTART,
    _gelu,
    _gelu_grad,
    _mm,
    _newton_schulz,
    _ns_gram_factor,
    next_pow2,
)
from .settings import PRECISIONS

# ---------------------------------------------------------------------------------------------
# Row loading shared by both depths
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(seq_base, tail_base, pos, ok, offs_d, D: tl.constexpr, TAIL: tl.constexpr):
    """Rows at sequence positions `pos` (B, D) in fp32; positions -TAIL..-1 come from the carried tail."""
    x = tl.load(seq_base + pos[:, None] * D + offs_d[None, :], mask=(ok & (pos >= 0))[:, None], other=0.0)
    x = x.to(tl.float32)
    if TAIL > 0:
        t = tl.load(tail_base + (pos + TAIL)[:, None] * D + offs_d[None, :], mask=(ok & (pos < 0))[:, None],
                    other=0.0)
        x += t.to(tl.float32)
    return x


@triton.jit
def _load_omega(g_base, tg_base, pos, ok, cnt, TAIL: tl.constexpr):
    g = tl.load(g_base + pos, mask=ok & (pos >= 0), other=0.0).to(tl.float32)
    if TAIL > 0:
        g += tl.load(tg_base + pos + TAIL, mask=ok & (pos < 0), other=0.0).to(tl.float32)
    return g * cnt


@triton.jit
def _omega_counts(offs_n, CHUNK: tl.constexpr, TAIL: tl.constexpr, HAS_COUNTS: tl.constexpr):
    """#{t in [0, b) : i <= t <= i + c - 1} for key row r = i + c - 1 (rows past the chunk weigh 0)."""
    if HAS_COUNTS:
        rel = offs_n - TAIL
        cnt = tl.minimum(rel + TAIL, CHUNK - 1) - tl.maximum(rel, 0) + 1
        cnt = tl.maximum(cnt, 0).to(tl.float32)
    else:  # the caller gives the Omega weights themselves
        cnt = tl.full(offs_n.shape, 1.0, tl.float32)
    return cnt


# ---------------------------------------------------------------------------------------------
# Depth 2: M(x) = x + W1 gelu(W2 x)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _read2(xq, w1_base, w2_base, offs_d, offs_e, D: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr,
           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    y = xq
    for eb in range(0, E // BLOCK_E):
        cols = eb * BLOCK_E + offs_e
        w2b = tl.load(w2_base + cols[:, None] * D + offs_d[None, :])
        w1b = tl.load(w1_base + offs_d[:, None] * E + cols[None, :])
        y += _mm(_gelu(_mm(xq, tl.trans(w2b), DOT_DTYPE, PRECISION)), tl.trans(w1b), DOT_DTYPE, PRECISION)
    return y


@triton.jit
def _ns_update(s_base, w_base, x_base, alpha, eta, R: tl.constexpr, C: tl.constexpr, SR: tl.constexpr,
               SC: tl.constexpr, SCALE: tl.constexpr, STEPS: tl.constexpr, NS_BLOCK: tl.constexpr,
               PRECISION: tl.constexpr, GRAM: tl.constexpr):
    """W = alpha W - eta NS(S) on the wide view (R <= C) of one weight matrix, given by strides.

    NS_BLOCK == C: the whole R x C iterate in registers. NS_BLOCK < C: column blocks streamed through
    the scratch x_base (R x C, row-major): each update X_blk <- Q X_blk (GRAM: Q of NS_RESTART steps
    at once, `_ns_gram_factor`; else n1 I + B of one step) needs only its own block, and the next
    Gram matrix A = sum_blk X_blk X_blk^T accumulates as blocks are written. Smaller tiles, for when
    the whole iterate does not fit on chip."""
    offs_r = tl.arange(0, R)
    if NS_BLOCK == C:
        offs = offs_r[:, None] * SR + tl.arange(0, C)[None, :] * SC
        x = _newton_schulz(tl.load(s_base + offs), STEPS, PRECISION, GRAM)
        w = tl.load(w_base + offs)
        tl.store(w_base + offs, alpha * w - eta * (x * SCALE))
    else:
        offs_c = tl.arange(0, NS_BLOCK)
        sq = 0.0
        for cb in range(0, C // NS_BLOCK):
            xb = tl.load(s_base + offs_r[:, None] * SR + (cb * NS_BLOCK + offs_c)[None, :] * SC)
            sq += tl.sum(tl.sum(xb * xb, axis=1), axis=0)
        inv = 1.0 / (tl.sqrt(sq) + NS_EPS)
        # X_0 = S / (||S|| + NS_EPS) is written to the scratch with its Gram matrix.
        a = tl.zeros([R, R], dtype=tl.float32)
        for cb in range(0, C // NS_BLOCK):
            cols = cb * NS_BLOCK + offs_c
            xb = tl.load(s_base + offs_r[:, None] * SR + cols[None, :] * SC) * inv
            tl.store(x_base + offs_r[:, None] * C + cols[None, :], xb)
            a += tl.dot(xb, tl.trans(xb), input_precision=PRECISION)
        tl.debug_barrier()
        if GRAM:
            for done in tl.static_range(0, STEPS, NS_RESTART):
                q = _ns_gram_factor(a, done, STEPS, PRECISION)
                a = tl.zeros([R, R], dtype=tl.float32)
                for cb in range(0, C // NS_BLOCK):
                    ox = offs_r[:, None] * C + (cb * NS_BLOCK + offs_c)[None, :]
                    xb = tl.dot(q, tl.load(x_base + ox), input_precision=PRECISION)
                    tl.store(x_base + ox, xb)
                    if done + NS_RESTART < STEPS:
                        a += tl.dot(xb, tl.trans(xb), input_precision=PRECISION)
                tl.debug_barrier()
        else:
            for _ in range(0, STEPS):
                b = NS_N2 * a + NS_N3 * tl.dot(a, a, input_precision=PRECISION)
                a = tl.zeros([R, R], dtype=tl.float32)
                for cb in range(0, C // NS_BLOCK):
                    ox = offs_r[:, None] * C + (cb * NS_BLOCK + offs_c)[None, :]
                    xb = tl.load(x_base + ox)
                    xb = tl.dot(b, xb, NS_N1 * xb, input_precision=PRECISION)
                    tl.store(x_base + ox, xb)
                    a += tl.dot(xb, tl.trans(xb), input_precision=PRECISION)
                tl.debug_barrier()
        for cb in range(0, C // NS_BLOCK):
            cols = cb * NS_BLOCK + offs_c
            ow = offs_r[:, None] * SR + cols[None, :] * SC
            x = tl.load(x_base + offs_r[:, None] * C + cols[None, :])
            tl.store(w_base + ow, alpha * tl.load(w_base + ow) - eta * (x * SCALE))
        tl.debug_barrier()  # the scratch is reused by the next matrix


@triton.jit
def _key_rows(k_base, v_base, g_base, tk_base, tv_base, tg_base, pos, rows, ok, offs_d, D: tl.constexpr,
              CHUNK: tl.constexpr, TAIL: tl.constexpr, HAS_COUNTS: tl.constexpr):
    """Keys, values (fp32) and Omega weights of key rows `rows` (0..c-2: tail, then the chunk) at `pos`."""
    x = _load_rows(k_base, tk_base, pos, ok, offs_d, D, TAIL)
    v = _load_rows(v_base, tv_base, pos, ok, offs_d, D, TAIL)
    omega = _load_omega(g_base, tg_base, pos, ok, _omega_counts(rows, CHUNK, TAIL, HAS_COUNTS), TAIL)
    return x, v, omega


@triton.jit
def _scan2_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, tk_ptr, tv_ptr, tg_ptr,
    eta_ptr, alpha_ptr, theta_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, x_ptr, out_ptr,
    T, NC, n_full, n_read,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, TAIL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    OPT: tl.constexpr, NS_STEPS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_READS: tl.constexpr,
    R: tl.constexpr, C: tl.constexpr, S1_SR: tl.constexpr, S1_SC: tl.constexpr,
    S2_SR: tl.constexpr, S2_SC: tl.constexpr, SCALE1: tl.constexpr, SCALE2: tl.constexpr,
    NS_BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, NS_GRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seq = pid * T * D
    q_base, k_base, v_base, out_base = q_ptr + seq, k_ptr + seq, v_ptr + seq, out_ptr + seq
    g_base = g_ptr + pid * T
    tk_base, tv_base, tg_base = tk_ptr + pid * TAIL * D, tv_ptr + pid * TAIL * D, tg_ptr + pid * TAIL
    w1_base, w2_base = w1_ptr + pid * D * E, w2_ptr + pid * D * E
    s1_base, s2_base = s1_ptr + pid * D * E, s2_ptr + pid * D * E
    x_base = x_ptr + pid * D * E  # Newton-Schulz scratch (used when NS_BLOCK < C)

    offs_d = tl.arange(0, D)
    # The chunk's rows (its queries, and key rows c-1..) and the Omega tail's key rows 0..c-2 in two
    # blocks, so that N = b + c - 1 key rows are not padded to 2b.
    offs_c = tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    c_ok = offs_c < CHUNK
    t_ok = offs_t < TAIL

    # W and S are rewritten in place every chunk: the launch passes num_stages=1 so that the software
    # pipeliner never prefetches the next chunk's W blocks ahead of this chunk's stores. The e-block
    # and Newton-Schulz loops are runtime loops, not static_range: unrolled, the compiler hoists the
    # blocks' loads together and runs out of registers (measured with ptxas for sm_90).
    for j in range(0, n_full):
        cpos = j * CHUNK + offs_c
        xc, vc, omc = _key_rows(k_base, v_base, g_base, tk_base, tv_base, tg_base, cpos, offs_c + TAIL, c_ok,
                                offs_d, D, CHUNK, TAIL, HAS_COUNTS)
        # Forward through the memory at W_{j-1}: the chunk's reads and the keys' predictions share
        # each e-block of W1, W2.
        mc = xc
        if TAIL > 0:
            tpos = j * CHUNK - TAIL + offs_t
            xt, vt, omt = _key_rows(k_base, v_base, g_base, tk_base, tv_base, tg_base, tpos, offs_t, t_ok,
                                    offs_d, D, CHUNK, TAIL, HAS_COUNTS)
            mt = xt
        if HAS_READS:
            xq = tl.load(q_base + cpos[:, None] * D + offs_d[None, :], mask=c_ok[:, None], other=0.0)
            xq = xq.to(tl.float32)
            yq = xq
        for eb in range(0, E // BLOCK_E):
            cols = eb * BLOCK_E + offs_e
            w2b = tl.load(w2_base + cols[:, None] * D + offs_d[None, :])
            w1b = tl.load(w1_base + offs_d[:, None] * E + cols[None, :])
            mc += _mm(_gelu(_mm(xc, tl.trans(w2b), DOT_DTYPE, PRECISION)), tl.trans(w1b), DOT_DTYPE,
                      PRECISION)
            if TAIL > 0:
                mt += _mm(_gelu(_mm(xt, tl.trans(w2b), DOT_DTYPE, PRECISION)), tl.trans(w1b), DOT_DTYPE,
                          PRECISION)
            if HAS_READS:
                yq += _mm(_gelu(_mm(xq, tl.trans(w2b), DOT_DTYPE, PRECISION)), tl.trans(w1b), DOT_DTYPE,
                          PRECISION)
        if HAS_READS:
            tl.store(out_base + cpos[:, None] * D + offs_d[None, :], yq, mask=c_ok[:, None])

        # err_i = omega_i (M(x_i) - v_i); padding rows have omega 0.
        errc = (mc - vc) * omc[:, None]
        if TAIL > 0:
            errt = (mt - vt) * omt[:, None]
        eta = tl.load(eta_ptr + pid * NC + j).to(tl.float32)
        alpha = tl.load(alpha_ptr + pid * NC + j).to(tl.float32)
        theta = tl.load(theta_ptr + pid * NC + j).to(tl.float32)

        # Gradients per e-block: dW1[:, blk] = err^T u_blk, dW2[blk] = ((err W1[:, blk]) * gelu'(h_blk))^T x.
        # A block's gradient needs only that block of W, so gd and momentum update it in place here
        # (after every thread is done reading W for the forward pass above).
        tl.debug_barrier()
        for eb in range(0, E // BLOCK_E):
            cols = eb * BLOCK_E + offs_e
            o1 = offs_d[:, None] * E + cols[None, :]
            o2 = cols[:, None] * D + offs_d[None, :]
            w2b = tl.load(w2_base + o2)
            w1b = tl.load(w1_base + o1)
            hc = _mm(xc, tl.trans(w2b), DOT_DTYPE, PRECISION)
            g1 = _mm(tl.trans(errc), _gelu(hc), DOT_DTYPE, PRECISION)
            pc = _mm(errc, w1b, DOT_DTYPE, PRECISION) * _gelu_grad(hc)
            g2 = _mm(tl.trans(pc), xc, DOT_DTYPE, PRECISION)
            if TAIL > 0:
                ht = _mm(xt, tl.trans(w2b), DOT_DTYPE, PRECISION)
                g1 += _mm(tl.trans(errt), _gelu(ht), DOT_DTYPE, PRECISION)
                pt = _mm(errt, w1b, DOT_DTYPE, PRECISION) * _gelu_grad(ht)
                g2 += _mm(tl.trans(pt), xt, DOT_DTYPE, PRECISION)
            if OPT == 0:
                tl.store(w1_base + o1, alpha * w1b - eta * g1)
                tl.store(w2_base + o2, alpha * w2b - eta * g2)
            else:
                s1 = theta * tl.load(s1_base + o1) + g1
                s2 = theta * tl.load(s2_base + o2) + g2
                tl.store(s1_base + o1, s1)
                tl.store(s2_base + o2, s2)
                if OPT == 1:
                    tl.store(w1_base + o1, alpha * w1b - eta * s1)
                    tl.store(w2_base + o2, alpha * w2b - eta * s2)
        if OPT == 2:
            # Muon needs each whole momentum matrix: written above by other threads, read back here.
            tl.debug_barrier()
            _ns_update(s1_base, w1_base, x_base, alpha, eta, R, C, S1_SR, S1_SC, SCALE1, NS_STEPS, NS_BLOCK,
                       PRECISION, NS_GRAM)
            _ns_update(s2_base, w2_base, x_base, alpha, eta, R, C, S2_SR, S2_SC, SCALE2, NS_STEPS, NS_BLOCK,
                       PRECISION, NS_GRAM)
        # The next chunk reads the weights this one wrote.
        tl.debug_barrier()

    if HAS_READS:
        if n_read > n_full:  # a trailing partial chunk: read at the final weights, not committed
            cpos = n_full * CHUNK + offs_c
            ok = c_ok & (cpos < T)
            xq = tl.load(q_base + cpos[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
            y = _read2(xq.to(tl.float32), w1_base, w2_base, offs_d, offs_e, D, E, BLOCK_E, DOT_DTYPE,
                       PRECISION)
            tl.store(out_base + cpos[:, None] * D + offs_d[None, :], y, mask=ok[:, None])


# ---------------------------------------------------------------------------------------------
# Depth 1: M(x) = W x, W and S in registers for the whole scan
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scan1_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, tk_ptr, tv_ptr, tg_ptr,
    eta_ptr, alpha_ptr, theta_ptr,
    w_ptr, s_ptr, out_ptr,
    T, NC, n_full, n_read,
    D: tl.constexpr, CHUNK: tl.constexpr, TAIL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    OPT: tl.constexpr, NS_STEPS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_READS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, NS_GRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seq = pid * T * D
    q_base, k_base, v_base, out_base = q_ptr + seq, k_ptr + seq, v_ptr + seq, out_ptr + seq
    g_base = g_ptr + pid * T
    tk_base, tv_base, tg_base = tk_ptr + pid * TAIL * D, tv_ptr + pid * TAIL * D, tg_ptr + pid * TAIL

    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    offs_w = offs_d[:, None] * D + offs_d[None, :]
    c_ok = offs_c < CHUNK
    t_ok = offs_t < TAIL

    w = tl.load(w_ptr + pid * D * D + offs_w)
    s = tl.zeros([D, D], dtype=tl.float32)
    if OPT != 0:
        s = tl.load(s_ptr + pid * D * D + offs_w)

    for j in range(0, n_full):
        cpos = j * CHUNK + offs_c
        if HAS_READS:
            xq = tl.load(q_base + cpos[:, None] * D + offs_d[None, :], mask=c_ok[:, None], other=0.0)
            y = _mm(xq.to(tl.float32), tl.trans(w), DOT_DTYPE, PRECISION)
            tl.store(out_base + cpos[:, None] * D + offs_d[None, :], y, mask=c_ok[:, None])
        xc, vc, omc = _key_rows(k_base, v_base, g_base, tk_base, tv_base, tg_base, cpos, offs_c + TAIL, c_ok,
                                offs_d, D, CHUNK, TAIL, HAS_COUNTS)
        err = (_mm(xc, tl.trans(w), DOT_DTYPE, PRECISION) - vc) * omc[:, None]
        grad = _mm(tl.trans(err), xc, DOT_DTYPE, PRECISION)
        if TAIL > 0:
            tpos = j * CHUNK - TAIL + offs_t
            xt, vt, omt = _key_rows(k_base, v_base, g_base, tk_base, tv_base, tg_base, tpos, offs_t, t_ok,
                                    offs_d, D, CHUNK, TAIL, HAS_COUNTS)
            err = (_mm(xt, tl.trans(w), DOT_DTYPE, PRECISION) - vt) * omt[:, None]
            grad += _mm(tl.trans(err), xt, DOT_DTYPE, PRECISION)
        eta = tl.load(eta_ptr + pid * NC + j).to(tl.float32)
        alpha = tl.load(alpha_ptr + pid * NC + j).to(tl.float32)
        theta = tl.load(theta_ptr + pid * NC + j).to(tl.float32)
        if OPT == 0:
            w = alpha * w - eta * grad
        else:
            s = theta * s + grad
            if OPT == 1:
                w = alpha * w - eta * s
            else:
                w = alpha * w - eta * _newton_schulz(s, NS_STEPS, PRECISION, NS_GRAM)

    if HAS_READS:
        if n_read > n_full:
            cpos = n_full * CHUNK + offs_c
            ok = c_ok & (cpos < T)
            xq = tl.load(q_base + cpos[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
            y = _mm(xq.to(tl.float32), tl.trans(w), DOT_DTYPE, PRECISION)
            tl.store(out_base + cpos[:, None] * D + offs_d[None, :], y, mask=ok[:, None])
    tl.store(w_ptr + pid * D * D + offs_w, w)
    if OPT != 0:
        tl.store(s_ptr + pid * D * D + offs_w, s)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
OPTIMIZERS = {"gd": 0, "momentum": 1, "muon": 2}  # the kernels' OPT codes
SCAN_WARPS = 8
SCAN_BLOCK_E = 64  # the e-block of the depth-2 passes
# Depth 1 without software pipelining: prefetching the next chunk's rows for gd and momentum takes
# 241 KB of shared memory at d=64 (compiled for sm_90), over the 227 KB a block may have. Four warps:
# at eight, Triton 3.6's muon kernel makes an out-of-range shared or local access on an H200
# (compute-sanitizer; d=64, fp32 and bf16 inputs), and four gave the same errors for gd.
SCAN1_STAGES = 1
SCAN1_WARPS = 4
# Newton-Schulz in the standard iteration. The reference's Gram form (`ns_gram=True`) has 35% fewer
# multiply-adds there, but compiled for sm_90 it spills more (2.3 KB against 2.2 per thread, whole
# matrix; 0.7 against 0.6 in column blocks) and it has not run on a GPU yet: bench/kernels.py --sweep.
NS_GRAM = False
NS_BLOCK_FALLBACK = 64  # Newton-Schulz's column block when the whole matrix does not fit on chip


def scan_constants(*, d: int, chunk: int, tail: int, optimizer: str, ns_steps: int, has_counts: bool,
                   has_reads: bool, dot_dtype: tl.dtype, precision: str, ns_gram: bool | None = None
                   ) -> dict[str, Any]:
    """The compile-time arguments both scan kernels take (`compile_check` builds its kernels from them)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    return dict(D=d, CHUNK=chunk, TAIL=tail, BLOCK_C=max(MIN_TILE, next_pow2(chunk)),
                BLOCK_T=max(MIN_TILE, next_pow2(tail)), OPT=OPTIMIZERS[optimizer], NS_STEPS=ns_steps,
                HAS_COUNTS=has_counts, HAS_READS=has_reads, DOT_DTYPE=dot_dtype, PRECISION=precision,
                NS_GRAM=NS_GRAM if ns_gram is None else ns_gram)


def wide_views(d: int, e: int) -> dict[str, Any]:
    """The depth-2 kernel's compile-time view of W1 (d, e) and W2 (e, d), both row-major, in the wide
    orientation (R <= C) that Newton-Schulz works in: strides, and the scales of its results."""
    wide1 = (e, 1) if d <= e else (1, e)  # W1 seen as (R, C)
    wide2 = (1, d) if d <= e else (d, 1)  # W2, transposed when d <= e
    return dict(E=e, R=min(d, e), C=max(d, e), S1_SR=wide1[0], S1_SC=wide1[1], S2_SR=wide2[0],
                S2_SC=wide2[1], SCALE1=ns_scale(d, e), SCALE2=ns_scale(e, d))


def _state_copy(t: Tensor) -> Tensor:
    # The kernel updates W and S in place: a private fp32 copy, contiguous per (session, head).
    return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


# The first tuning that fitted on chip, per compile-time configuration of the depth-2 kernel.
_FITTED: dict[tuple, tuple[int, int]] = {}


def _launch(q: Tensor | None, k: Tensor, v: Tensor, g: Tensor, tails: tuple[Tensor, Tensor, Tensor] | None,
            eta: Tensor, alpha: Tensor, theta: Tensor, weights: Weights, momentum: Weights, *,
            chunk: int, n_full: int, has_counts: bool, optimizer: str, ns_steps: int, precision: str,
            low_precision_dots: bool, block_e: int | None = None, ns_block: int | None = None,
            num_warps: int | None = None, ns_gram: bool | None = None
            ) -> tuple[Tensor | None, Weights, Weights]:
    bsz, h, t, d = k.shape
    depth = len(weights)
    e = weights[0].shape[-1] if depth == 2 else d
    has_reads = q is not None
    tail = 0 if tails is None else tails[0].shape[2]
    dot_dtype = _DOT_DTYPES.get(k.dtype, tl.float32) if low_precision_dots else tl.float32
    consts = scan_constants(d=d, chunk=chunk, tail=tail, optimizer=optimizer, ns_steps=ns_steps,
                            has_counts=has_counts, has_reads=has_reads, dot_dtype=dot_dtype,
                            precision=precision, ns_gram=ns_gram)
    if not supported(depth, d, e):
        raise ValueError(f"unsupported memory shape: depth {depth}, d {d}, e {e} "
                         f"(powers of two >= {MIN_TILE})")
    k, v, g = k.contiguous(), v.contiguous(), g.contiguous()
    q = q.contiguous() if q is not None else k  # k: a dummy pointer, never read
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if has_reads else k
    # Dummies when there is no tail.
    tk, tv, tg = (k, v, g) if tail == 0 or tails is None else (x.contiguous() for x in tails)
    gates = [x.to(torch.float32).contiguous() for x in (eta, alpha, theta)]
    nc = gates[0].shape[-1]
    if nc < n_full:
        raise ValueError(f"{nc} chunk gates for {n_full} chunks")
    gd = optimizer == "gd"
    w = tuple(_state_copy(x) for x in weights)
    s = w if gd else tuple(_state_copy(x) for x in momentum)  # dummies for gd
    result = (out if has_reads else None), w, (() if gd else s)
    if bsz * h == 0 or (t == 0 and has_reads):  # nothing to launch (and no pointers to give)
        return result
    inputs = (q, k, v, g, tk, tv, tg, *gates)
    runtime = dict(T=t, NC=nc, n_full=n_full, n_read=-(-t // chunk) if has_reads else n_full)
    if depth == 1:
        try:
            _scan1_kernel[(bsz * h,)](*inputs, w[0], s[0], out, **runtime, **consts,
                                      num_warps=num_warps or SCAN1_WARPS, num_stages=SCAN1_STAGES)
        except OutOfResources as exc:
            unfit(1, d, d)
            msg = f"the depth-1 chunk kernel does not fit on this device (d {d}): {exc}"
            raise KernelResourceError(msg) from exc
    else:
        _launch_depth2(inputs, w, s, out, runtime, consts, e, programs=bsz * h, block_e=block_e,
                       ns_block=ns_block, num_warps=num_warps)
    return result


def _launch_depth2(inputs: tuple[Tensor, ...], w: Weights, s: Weights, out: Tensor, runtime: dict[str, int],
                   consts: dict[str, Any], e: int, *, programs: int, block_e: int | None,
                   ns_block: int | None, num_warps: int | None) -> None:
    for name, size in (("block_e", block_e), ("ns_block", ns_block)):
        if size is not None and not is_tile(size):
            raise ValueError(f"{name} must be a power of two >= {MIN_TILE}")
    d = consts["D"]
    args = dict(wide_views(d, e), **consts)
    cols, warps = args["C"], num_warps or SCAN_WARPS
    # Tunings tried in order until one fits in shared memory: Newton-Schulz on the whole matrix in
    # registers, else in column blocks, then smaller e-blocks. Explicit arguments pin a tuning.
    pinned = bool(ns_block or block_e)
    act = inputs[1].dtype  # k's: the activations' pointer type is compiled in too
    key = (d, e, warps, str(act), *sorted((n, str(x)) for n, x in consts.items()))
    if pinned:
        ladder = [(min(ns_block or cols, cols), min(block_e or SCAN_BLOCK_E, e))]
    elif key in _FITTED:
        ladder = [_FITTED[key]]
    else:
        nb, be = min(NS_BLOCK_FALLBACK, cols), min(SCAN_BLOCK_E, e)
        ladder = list(dict.fromkeys([(cols, be), (nb, be), (nb, min(32, e)), (nb, MIN_TILE)]))
    last: Exception | None = None
    for nb, be in ladder:
        blocked = consts["OPT"] == OPTIMIZERS["muon"] and nb < cols
        scratch = torch.empty(programs * d * e, dtype=torch.float32, device=w[0].device) if blocked else w[0]
        try:
            _scan2_kernel[(programs,)](*inputs, w[0], w[1], s[0], s[1], scratch, out, **runtime,
                                       NS_BLOCK=nb, BLOCK_E=be, **args, num_warps=warps, num_stages=1)
        except OutOfResources as exc:
            if pinned:
                raise
            last = exc
            continue
        if not pinned:
            _FITTED[key] = (nb, be)
        return
    unfit(2, d, e)
    raise KernelResourceError(f"no tuning of the depth-2 chunk kernel fits on this device (d {d}, e {e}): "
                              f"{last}")


def _new_tail(tail: Tensor, x: Tensor, end: int) -> Tensor:
    """The last c-1 rows of [tail, x[:, :, :end]] along dim 2, without concatenating all of x."""
    n = tail.shape[2]
    if n == 0 or end == 0:
        return tail
    if end >= n:
        return x[:, :, end - n:end]
    return torch.cat([tail[:, :, end:], x[:, :, :end]], dim=2)


def chunk_scan(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, alpha: Tensor, theta: Tensor,
               weights: Weights, momentum: Weights, tail_k: Tensor, tail_v: Tensor, tail_gamma: Tensor, *,
               chunk_size: int, optimizer: str, ns_steps: int, precision: str = "tf32",
               low_precision_dots: bool = False, block_e: int | None = None, ns_block: int | None = None,
               num_warps: int | None = None, ns_gram: bool | None = None
               ) -> tuple[Tensor, Weights, Weights, tuple[Tensor, Tensor, Tensor]]:
    """Reads for all T tokens and the state after the T // b whole chunks.

    q, k, v: (B, H, T, d) phi(q), phi(k), v; gamma (B, H, T); eta, alpha, theta (B, H, >= T // b);
    weights (W1 (B, H, d, e), W2 (B, H, e, d)) or (W,), momentum likewise (empty for gd);
    tail_k, tail_v (B, H, c-1, d), tail_gamma (B, H, c-1): the Omega tail carried in.
    Returns the reads (B, H, T, d) in q's dtype, the new weights and momentum (fp32) and the new tail.
    `precision` is the fp32 dot mode (tf32, tf32x3 or ieee); `low_precision_dots` rounds the operands of
    the read and gradient products to the inputs' 16-bit dtype (Newton-Schulz stays fp32). Tuning
    (depth 2): block_e, the e-block of the gradient pass (64); ns_block, the column block of Newton-Schulz
    (default: the whole matrix in registers, falling back to 64 if that does not fit); num_warps;
    ns_gram, Newton-Schulz in the reference's Gram form or the standard iteration (default NS_GRAM)."""
    n_full = k.shape[2] // chunk_size
    reads, w, s = _launch(q, k, v, gamma, (tail_k, tail_v, tail_gamma), eta, alpha, theta, weights, momentum,
                          chunk=chunk_size, n_full=n_full, has_counts=True, optimizer=optimizer,
                          ns_steps=ns_steps, precision=precision, low_precision_dots=low_precision_dots,
                          block_e=block_e, ns_block=ns_block, num_warps=num_warps, ns_gram=ns_gram)
    assert reads is not None  # q was given
    end = n_full * chunk_size
    new_gamma = _new_tail(tail_gamma[..., None], gamma[..., None], end)[..., 0]
    return reads, w, s, (_new_tail(tail_k, k, end), _new_tail(tail_v, v, end), new_gamma)


def chunk_update(weights: Weights, momentum: Weights, x: Tensor, v: Tensor, omega: Tensor, eta: Tensor,
                 alpha: Tensor, theta: Tensor, optimizer: str, ns_steps: int, *, precision: str = "tf32",
                 low_precision_dots: bool = False) -> tuple[Weights, Weights]:
    """The engine's `chunk_update` (one optimiser step; x, v (B, H, N, d) already hold the Omega tail and
    omega (B, H, N) the Omega weights; eta, alpha, theta (B, H)), fused. Returns fp32 weights, momentum."""
    # The kernel's row blocks are powers of two: N = b + c - 1 rows go as a chunk of the largest power
    # of two <= N and a short tail (71 = 64 + 7 rows at b=64, c=8), not as 128 padded rows.
    n = x.shape[2]
    body = n if n <= MIN_TILE else 1 << (n.bit_length() - 1)
    tail = n - body
    tails = (x[:, :, :tail], v[:, :, :tail], omega[:, :, :tail]) if tail else None
    _, w, s = _launch(None, x[:, :, tail:], v[:, :, tail:], omega[:, :, tail:], tails, eta[..., None],
                      alpha[..., None], theta[..., None], weights, momentum, chunk=body, n_full=1,
                      has_counts=False, optimizer=optimizer, ns_steps=ns_steps, precision=precision,
                      low_precision_dots=low_precision_dots)
    return w, s
