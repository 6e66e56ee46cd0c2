"""The reference chunk step of the ATLAS memory: the specification of docs/model.md, "One ATLAS memory
layer", in PyTorch.

One function per formula: reads, Omega-weighted analytic gradients, momentum, Newton-Schulz, the
update, and the step looped over many chunks (`chunk_scan_reference`). The Triton kernels (kernels/)
mirror these functions and take their constants from here; `AtlasMemory` (memory.py) runs a stream
through them, or through the kernels where they apply. Everything is differentiable (training
backprops through the chunk recurrence) and float64-capable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from atlas.kernels.settings import NsPrecision

T = TypeVar("T")

# The chunk step's constants, defined here only: the Triton kernels (kernels/_common.py) import them.
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (n1, n2, n3) of the quintic Newton-Schulz iteration, as in Muon
NS_EPS = 1e-7  # in the norm Newton-Schulz starts by dividing by: NS of a zero momentum stays zero
NS_RESTART = 3  # Newton-Schulz steps between recomputations of the Gram matrix (`_ns_gram_factor`)
GELU_CUBIC = 0.044715  # of the tanh-form GELU: x/2 (1 + tanh(sqrt(2/pi) (x + GELU_CUBIC x^3)))
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

Weights = tuple[Tensor, ...]  # (W1, W2) for depth 2, (W,) for depth 1; each (B, H, rows, cols)


# ---------------------------------------------------------------------------------------------
# The chunk step
# ---------------------------------------------------------------------------------------------


def gelu(x: Tensor) -> Tensor:
    """The tanh-form GELU, x/2 (1 + tanh(s (x + c x^3))) = x p with p = sigmoid(2 s (x + c x^3)).

    Written out rather than F.gelu: on CPU, ATen's tanh-GELU runs several times slower than its sigmoid, and
    x.pow(3) ~20x slower than a product. It rounds differently from F.gelu in the last bits only."""
    return x * _gelu_gate(x, x * x)


def _gelu_gate(x: Tensor, xx: Tensor) -> Tensor:
    """p = sigmoid(2 s (x + c x^3)) = (1 + tanh(s (x + c x^3))) / 2, given xx = x * x."""
    return torch.sigmoid(torch.addcmul(x, x, xx, value=GELU_CUBIC) * (2 * SQRT_2_OVER_PI))


def gelu_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """The tanh-form GELU and its derivative from one sigmoid (the gradients need both at the same h).

    With p as in `gelu`: gelu' = p + x p (1 - p) 2 s (1 + 3 c x^2), since 1 - tanh^2 = 4 p (1 - p).
    The value has the bits of `gelu(x)`. Every operation is out of place (training differentiates
    through it): eleven passes over x's size where the tanh form took fourteen."""
    xx = x * x
    p = _gelu_gate(x, xx)
    value = x * p
    slope = xx * (6 * GELU_CUBIC * SQRT_2_OVER_PI) + 2 * SQRT_2_OVER_PI
    grad = torch.addcmul(p, value * (1.0 - p), slope)
    return value, grad


def gelu_grad(x: Tensor) -> Tensor:
    """d/dx of the tanh-form GELU."""
    return gelu_and_grad(x)[1]


def feature_map(x: Tensor, coeffs: Tensor) -> Tensor:
    """phi(x) = sum_i a_i x^i, elementwise; x (B, H, N, d), coeffs (H, p)."""
    # The sum a_1 x + a_2 x^2 + ... in this order, as the formula reads (no Horner: the same bits
    # as summing the powers), with the coefficients laid out once.
    a = coeffs.to(x.dtype).T[:, None, :, None, None]  # (p, 1, H, 1, 1)
    out = a[0] * x
    power = x
    for i in range(1, coeffs.shape[-1]):
        power = power * x
        out = out + a[i] * power
    return out


def outside_autocast(fn: Callable[..., T]) -> Callable[..., T]:
    """Run the memory's inner loop at the precision docs/model.md ("Precision") requires, also
    under autocast (bf16 training): autocast would lower its products, whose inputs the model casts
    to the state dtype, back to bf16. Costs nothing where autocast is off."""

    @functools.wraps(fn)
    def run(weights: Weights, *args: Any, **kwargs: Any) -> T:
        device = weights[0].device.type
        if not torch.is_autocast_enabled(device):
            return fn(weights, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(weights, *args, **kwargs)

    return run


@outside_autocast
def memory_read(weights: Weights, x: Tensor) -> Tensor:
    """M_W(x) for x (B, H, N, d)."""
    x = x.to(weights[0].dtype)
    if len(weights) == 1:
        return x @ weights[0].mT
    w1, w2 = weights
    return x + gelu(x @ w2.mT) @ w1.mT


def memory_grads(weights: Weights, x: Tensor, v: Tensor, omega: Tensor) -> Weights:
    """sum_i omega_i * grad_W 1/2 ||M_W(x_i) - v_i||^2, analytically; omega (B, H, N)."""
    x, v, omega = (t.to(weights[0].dtype) for t in (x, v, omega))
    if len(weights) == 1:
        (w,) = weights
        err = (x @ w.mT - v) * omega[..., None]
        return (err.mT @ x,)
    w1, w2 = weights
    h = x @ w2.mT
    u, du = gelu_and_grad(h)
    err = (x + u @ w1.mT - v) * omega[..., None]
    d_w1 = err.mT @ u
    d_w2 = ((err @ w1) * du).mT @ x
    return (d_w1, d_w2)


def ns_scale(rows: int, cols: int) -> float:
    """The factor Newton-Schulz's result is scaled by, for a (rows, cols) matrix (Muon's)."""
    return math.sqrt(max(1.0, rows / cols))


def ns_compute_dtype(dtype: torch.dtype, precision: NsPrecision) -> torch.dtype:
    """The dtype Newton-Schulz iterates in, for momentum of `dtype`: at least fp32 (float64 stays
    float64), or bf16 for an fp32 momentum where `precision` is "bf16" (docs/model.md, "Precision")."""
    wide = torch.promote_types(dtype, torch.float32)
    return torch.bfloat16 if precision == "bf16" and wide == torch.float32 else wide


def newton_schulz(x: Tensor, steps: int, precision: NsPrecision = "fp32") -> Tensor:
    """Approximate orthogonalisation of each matrix in x (..., rows, cols), as in Muon."""
    return newton_schulz_many((x,), steps, precision)[0]


def newton_schulz_many(xs: tuple[Tensor, ...], steps: int,
                       precision: NsPrecision = "fp32") -> tuple[Tensor, ...]:
    """`newton_schulz` of each tensor of xs, in the Gram form (docs/model.md, "Newton-Schulz").

    Each step multiplies the wide orientation Y on the left by a polynomial in its Gram matrix
    A = Y Y^T, so k steps are one product with Q = Z_k ... Z_1, where Z = n1 I + n2 A + n3 A^2 and A
    advances as Z A Z: two products with the (r, c) matrix per NS_RESTART steps instead of two per
    step, the rest on (r, r) matrices. A tall X is not transposed: its Gram matrix is X^T X and Q^T
    multiplies it on the right. Where the Gram matrices of xs have one shape and dtype (W1 (d, e) and
    W2 (e, d) always do), their small products run as one batch. The results are in the wider of
    each x's dtype and fp32, whatever `precision` computes in."""
    tall = [x.shape[-2] > x.shape[-1] for x in xs]
    ys = []
    for x in xs:
        y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, *x.shape[-2:])
        y = y / (torch.linalg.matrix_norm(y, keepdim=True) + NS_EPS)
        ys.append(y.to(ns_compute_dtype(y.dtype, precision)))
    scales = [ns_scale(*x.shape[-2:]) for x in xs]
    for done in range(0, steps, NS_RESTART):
        k = min(NS_RESTART, steps - done)
        grams = [torch.bmm(y.mT, y) if t else torch.bmm(y, y.mT) for y, t in zip(ys, tall, strict=True)]
        if len(grams) > 1 and len({(g.shape[1:], g.dtype) for g in grams}) == 1:
            qs = _ns_gram_factor(torch.cat(grams), k).split([g.shape[0] for g in grams])
        else:
            qs = tuple(_ns_gram_factor(g, k) for g in grams)
        if done + k == steps:  # the scale rides in the last small factor (x * 1.0 is x: skip it)
            qs = tuple(q * sc if sc != 1.0 else q for q, sc in zip(qs, scales, strict=True))
        ys = [torch.bmm(y, q.mT) if t else torch.bmm(q, y) for y, q, t in zip(ys, qs, tall, strict=True)]
    if steps == 0:
        ys = [y * sc if sc != 1.0 else y for y, sc in zip(ys, scales, strict=True)]
    return tuple(y.to(torch.promote_types(x.dtype, torch.float32)).view(x.shape)
                 for x, y in zip(xs, ys, strict=True))


def _ns_gram_factor(a: Tensor, steps: int) -> Tensor:
    """Q of `steps` iteration steps from the Gram matrices A (n, r, r): Y after them is Q Y.

    Z = n1 I + n2 A + n3 A^2 is a baddbmm (beta * A + alpha * A A) and n1 on the diagonal. Rounding
    in A grows along Y's small singular directions (a spurious negative eigenvalue grows like
    p(0)^2 = 11.9 per step, and faster as it grows); recomputing A from Y every NS_RESTART steps
    keeps the result as close to float64 as the standard iteration's (tests/test_reference_step.py)."""
    n1, n2, n3 = NS_COEFFS
    q = a  # replaced at the first step
    for i in range(steps):
        z = torch.baddbmm(a, a, a, beta=n2, alpha=n3)
        z.diagonal(dim1=-2, dim2=-1).add_(n1)
        q = z if i == 0 else torch.bmm(z, q)
        if i + 1 < steps:
            a = torch.bmm(torch.bmm(z, a), z)
    return q


@functools.lru_cache(maxsize=64)
def omega_counts(chunk: int, window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """#{t in chunk : i <= t <= i + c - 1} for the c-1 tail tokens and the chunk's b tokens.

    Cached (every chunk of a model needs the same one): callers must not modify it. Made outside
    inference mode, so a tensor first asked for while serving can still be used in training."""
    tail = [max(0, min(window - m, chunk)) for m in range(window - 1, 0, -1)]
    body = [min(window, chunk - r) for r in range(chunk)]
    with torch.inference_mode(False):
        return torch.tensor(tail + body, dtype=dtype, device=device)


def chunk_update(
    weights: Weights,
    momentum: Weights,
    x: Tensor,
    v: Tensor,
    omega: Tensor,
    eta: Tensor,
    alpha: Tensor,
    theta: Tensor,
    optimizer: str,
    ns_steps: int,
    first_order: bool = False,
    ns_precision: NsPrecision = "fp32",
) -> tuple[Weights, Weights]:
    """One optimiser step of the memory on one chunk.

    x, v: (B, H, N, d) keys (after phi) and values of the c-1 tail tokens and the chunk;
    omega: (B, H, N) Omega weights; eta, alpha, theta: (B, H) chunk gates.
    Gradients are taken at the chunk-start weights. `first_order` (training only; the values are
    the same) stops autograd through the inner gradient's dependence on those weights, so the
    backward recurrence from chunk to chunk is linear (W_j depends on W_{j-1} through alpha alone)
    instead of passing through Newton-Schulz's Jacobian at every chunk, which explodes over
    hundreds of chunks."""
    grads = memory_grads(tuple(w.detach() for w in weights) if first_order else weights, x, v, omega)
    eta, alpha, theta = (g.to(weights[0].dtype)[..., None, None] for g in (eta, alpha, theta))
    if optimizer == "gd":
        new_s: Weights = ()
        steps = grads
    else:
        new_s = tuple(torch.addcmul(g, theta, s) for s, g in zip(momentum, grads, strict=True))  # theta S + G
        steps = new_s
        if optimizer == "muon":  # both matrices orthogonalised in one batch
            ortho = newton_schulz_many(new_s, ns_steps, ns_precision)
            steps = tuple(o.to(w.dtype) for o, w in zip(ortho, weights, strict=True))
    # alpha W - eta step
    new_w = tuple(torch.addcmul(alpha * w, eta, step, value=-1.0)
                  for w, step in zip(weights, steps, strict=True))
    return new_w, new_s


def memory_of(state: dict[str, Tensor], optimizer: str) -> tuple[tuple[str, ...], Weights, Weights]:
    """The weight names, weights and momentum (none for gd) of a memory state."""
    names = ("W",) if "W" in state else ("W1", "W2")
    momentum = tuple(state["S" + n[1:]] for n in names) if optimizer != "gd" else ()
    return names, tuple(state[n] for n in names), momentum


def memory_entries(names: tuple[str, ...], weights: Weights, momentum: Weights,
                    tails: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    new = dict(zip(names, weights, strict=True), tail_k=tails[0], tail_v=tails[1], tail_gamma=tails[2])
    new.update({"S" + n[1:]: s for n, s in zip(names, momentum, strict=False)})
    return new


def chunk_scan_reference(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, alpha: Tensor,
                         theta: Tensor, state: dict[str, Tensor], chunk_size: int, optimizer: str,
                         ns_steps: int,
                         ns_precision: NsPrecision = "fp32") -> tuple[Tensor, dict[str, Tensor]]:
    """Many chunks of one stream: the chunk step above, looped (the specification of `chunk_scan`).

    q, k, v: (B, H, T, d) phi(q), phi(k), v; gamma (B, H, T); eta (times eta_max), alpha, theta
    (B, H, >= T // b) chunk gates; state: W1, W2 (or W), S1, S2 (or S; none for gd), tail_k, tail_v,
    tail_gamma, as in `AtlasMemory.init_state`. The T // b whole chunks are committed; a trailing
    partial chunk is only read, at the final weights. Returns the reads (B, H, T, d) in q's dtype
    (before the head norm) and the state's new memory entries."""
    names, weights, momentum = memory_of(state, optimizer)
    tk, tv, tg = state["tail_k"], state["tail_v"], state["tail_gamma"]
    b, t, tail = chunk_size, k.shape[2], tk.shape[2]
    counts = omega_counts(b, tail + 1, gamma.dtype, gamma.device)
    reads = []
    for j in range(-(-t // b)):
        sl = slice(j * b, (j + 1) * b)
        reads.append(memory_read(weights, q[:, :, sl]).to(q.dtype))
        if (j + 1) * b > t:
            break
        keys, vals = torch.cat([tk, k[:, :, sl]], 2), torch.cat([tv, v[:, :, sl]], 2)
        gammas = torch.cat([tg, gamma[:, :, sl]], 2)
        weights, momentum = chunk_update(weights, momentum, keys, vals, gammas * counts, eta[..., j],
                                         alpha[..., j], theta[..., j], optimizer, ns_steps,
                                         ns_precision=ns_precision)
        n = keys.shape[2]
        tk, tv, tg = keys[:, :, n - tail:], vals[:, :, n - tail:], gammas[:, :, n - tail:]
    new = memory_entries(names, weights, momentum, (tk, tv, tg))
    return torch.cat(reads, dim=2) if reads else q.new_empty(q.shape), new
