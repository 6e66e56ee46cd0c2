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
def _newton_schulz(x, STEPS: tl.constexpr, PRECISION: tl.constexpr):
    """NS_k of a wide fp32 tile (rows <= cols) held in registers; the caller applies the final scale."""
    x = x / (tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0)) + NS_EPS)
    for _ in range(0, STEPS):
        a = tl.dot(x, tl.trans(x), input_precision=PRECISION)
        b = NS_N2 * a + NS_N3 * tl.dot(a, a, input_precision=PRECISION)
        x = tl.dot(b, x, NS_N1 * x, input_precision=PRECISION)
    return x
