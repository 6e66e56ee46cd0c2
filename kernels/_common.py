"""Triton helpers shared by the chunk and read kernels: GELU (tanh form), its derivative, Newton-Schulz.

Their constants are the engine reference's (engine/model/reference_step.py), as compile-time values."""

from __future__ import annotations

import triton
import triton.language as tl

from atlas.engine.model import reference_step as reference

SQRT_2_OVER_PI = tl.constexpr(reference.SQRT_2_OVER_PI)
GELU_CUBIC = tl.constexpr(reference.GELU_CUBIC)
NS_N1, NS_N2, NS_N3 = (tl.constexpr(c) for c in reference.NS_COEFFS)
NS_EPS = tl.constexpr(reference.NS_EPS)
NS_RESTART = tl.constexpr(reference.NS_RESTART)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _tanh(x):
    # Through the sigmoid: a tanh intrinsic is not spelled the same in every Triton release. The clamp
    # keeps exp finite (tanh(15) is 1 in fp32).
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gelu(h):
    t = _tanh(SQRT_2_OVER_PI * (h + GELU_CUBIC * h * h * h))
    return 0.5 * h * (1.0 + t)


@triton.jit
def _gelu_grad(h):
    t = _tanh(SQRT_2_OVER_PI * (h + GELU_CUBIC * h * h * h))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * h * h)


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; operands rounded to DOT_DTYPE (fp32: PRECISION says tf32 or ieee)."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _ns_gram_factor(a, DONE: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr):
    """Q of the iteration's steps DONE .. min(DONE + NS_RESTART, STEPS) from the (R, R) Gram matrix A of
    the iterate X: X after them is Q X (the reference's `_ns_gram_factor`)."""
    offs = tl.arange(0, a.shape[0])
    diag = offs[:, None] == offs[None, :]
    q = tl.where(diag, 1.0, 0.0)
    for _ in range(0, min(NS_RESTART, STEPS - DONE)):
        z = NS_N2 * a + NS_N3 * tl.dot(a, a, input_precision=PRECISION) + tl.where(diag, NS_N1, 0.0)
        q = tl.dot(z, q, input_precision=PRECISION)
        a = tl.dot(tl.dot(z, a, input_precision=PRECISION), z, input_precision=PRECISION)
    return q


@triton.jit
def _newton_schulz(x, STEPS: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr):
    """NS_k of a wide fp32 tile (rows <= cols) held in registers; the caller applies the final scale.

    GRAM: the reference's Gram form (engine/model/reference_step.py, `newton_schulz_many`): two
    products with the (R, C) tile per NS_RESTART steps, the rest on (R, R) matrices. Else the
    standard iteration, two (R, C) products a step."""
    x = x / (tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0)) + NS_EPS)
    if GRAM:
        for done in tl.static_range(0, STEPS, NS_RESTART):
            q = _ns_gram_factor(tl.dot(x, tl.trans(x), input_precision=PRECISION), done, STEPS, PRECISION)
            x = tl.dot(q, x, input_precision=PRECISION)
    else:
        for _ in range(0, STEPS):
            a = tl.dot(x, tl.trans(x), input_precision=PRECISION)
            b = NS_N2 * a + NS_N3 * tl.dot(a, a, input_precision=PRECISION)
            x = tl.dot(b, x, NS_N1 * x, input_precision=PRECISION)
    return x
