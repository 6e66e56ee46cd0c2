"""The ATLAS long-term memory: the reference chunk step and the streaming layer around it.

The reference implementation of docs/model.md, "One ATLAS memory layer". The functions in the first
half are the chunk step (reads, Omega-weighted analytic gradients, momentum, Newton-Schulz, update);
Triton kernels mirror them. `AtlasMemory` runs one chunk block of a stream through them and carries
the state (weights, momentum, Omega tail, conv tail) from chunk to chunk; the LM drives it on the
absolute chunk grid.
Everything is differentiable (training backprops through the chunk recurrence) and float64-capable.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas import kernels
from atlas.kernels.settings import NsPrecision, kernel_settings

from ..config import ModelConfig

T = TypeVar("T")

_log = logging.getLogger(__name__)

# The chunk step's constants, defined here only: the Triton kernels (kernels/_common.py) import them.
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (n1, n2, n3) of the quintic Newton-Schulz iteration, as in Muon
NS_EPS = 1e-7  # in the norm Newton-Schulz starts by dividing by: NS of a zero momentum stays zero
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


def _ns_wide(wide: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """The iteration on matrices already in the wide orientation, (n, r, c) with r <= c, computed in
    `dtype` after the normalisation and returned in wide's dtype.

    Y <- n1 Y + n2 A Y + n3 A^2 Y with A = Y Y^T, as (n1 I + n2 A + n3 A^2) Y: the scalars ride in
    the small (r, r) products (baddbmm: beta * input + alpha * product, then n1 on the diagonal), so a
    step is three BLAS calls and no pass over the wide matrix besides the products."""
    out_dtype = wide.dtype
    wide = (wide / (torch.linalg.matrix_norm(wide, keepdim=True) + NS_EPS)).to(dtype)
    n1, n2, n3 = NS_COEFFS
    for _ in range(steps):
        a = torch.bmm(wide, wide.mT)
        b = torch.baddbmm(a, a, a, beta=n2, alpha=n3)
        b.diagonal(dim1=-2, dim2=-1).add_(n1)
        wide = torch.bmm(b, wide)
    return wide.to(out_dtype)


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
    """`newton_schulz` of each tensor of xs. Where their wide orientations have the same shape (W1
    (d, e) and W2 (e, d) always do), they run as one batch: one BLAS call per product for both.
    The results are in the wider of each x's dtype and fp32, whatever `precision` computes in."""
    wides = []
    for x in xs:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        wides.append(x.mT if x.shape[-2] > x.shape[-1] else x)
    shape = wides[0].shape
    dtype = ns_compute_dtype(wides[0].dtype, precision)
    if all(w.shape == shape and w.dtype == wides[0].dtype for w in wides):
        both = torch.stack(wides) if len(wides) > 1 else wides[0]
        outs = _ns_wide(both.reshape(-1, *shape[-2:]), steps, dtype).view(len(wides), *shape).unbind(0)
    else:
        outs = tuple(_ns_wide(w.reshape(-1, *w.shape[-2:]), steps, ns_compute_dtype(w.dtype, precision))
                     .view(w.shape) for w in wides)
    result = []
    for x, out in zip(xs, outs, strict=True):
        rows, cols = x.shape[-2:]
        out = out.mT if rows > cols else out
        scale = ns_scale(rows, cols)
        result.append(out * scale if scale != 1.0 else out)  # x * 1.0 is x: skip the pass
    return tuple(result)


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


def _memory_of(state: dict[str, Tensor], optimizer: str) -> tuple[tuple[str, ...], Weights, Weights]:
    """The weight names, weights and momentum (none for gd) of a memory state."""
    names = ("W",) if "W" in state else ("W1", "W2")
    momentum = tuple(state["S" + n[1:]] for n in names) if optimizer != "gd" else ()
    return names, tuple(state[n] for n in names), momentum


def _memory_entries(names: tuple[str, ...], weights: Weights, momentum: Weights,
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
    names, weights, momentum = _memory_of(state, optimizer)
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
    new = _memory_entries(names, weights, momentum, (tk, tv, tg))
    return torch.cat(reads, dim=2) if reads else q.new_empty(q.shape), new


# ---------------------------------------------------------------------------------------------
# The fused kernels or the reference
# ---------------------------------------------------------------------------------------------


def use_kernels(weights: Weights, *tensors: Tensor) -> bool:
    """Whether the fused Triton kernels (kernels/) take a chunk step or read, per `KernelSettings`
    (ATLAS_KERNELS: auto, on or off). Only for fp32 state and without autograd: training
    differentiates through the reference."""
    mode = kernel_settings().kernels
    if mode == "off":
        return False
    everything = (*weights, *tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in everything):
        return False
    if weights[0].dtype != torch.float32 or (mode == "auto" and not all(t.is_cuda for t in everything)):
        return False
    d, e = weights[0].shape[-2], weights[0].shape[-1]
    return kernels.available() and kernels.supported(len(weights), d, e)


@outside_autocast
def chunk_step(weights: Weights, momentum: Weights, x: Tensor, v: Tensor, omega: Tensor, eta: Tensor,
               alpha: Tensor, theta: Tensor, optimizer: str, ns_steps: int,
               first_order: bool = False) -> tuple[Weights, Weights]:
    """`chunk_update`, by the fused kernel where `use_kernels` says so."""
    if use_kernels(weights, *momentum, x, v, omega, eta, alpha, theta):
        try:
            return kernels.chunk_update(weights, momentum, x, v, omega, eta, alpha, theta, optimizer,
                                        ns_steps, precision=kernel_settings().kernel_precision)
        except kernels.KernelResourceError as exc:  # the shape is now marked unsupported
            _log.warning("fused chunk kernel unavailable, using the reference: %s", exc)
    return chunk_update(weights, momentum, x, v, omega, eta, alpha, theta, optimizer, ns_steps, first_order,
                        kernel_settings().ns_precision)


def read_step(weights: Weights, x: Tensor) -> Tensor:
    """`memory_read`, by the fused decode kernel where `use_kernels` says so."""
    return kernels.memory_read(weights, x) if use_kernels(weights, x) else memory_read(weights, x)


def chunk_scan(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, alpha: Tensor, theta: Tensor,
               state: dict[str, Tensor], chunk_size: int, optimizer: str,
               ns_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
    """`chunk_scan_reference`, by the fused kernel where `use_kernels` says so."""
    names, weights, momentum = _memory_of(state, optimizer)
    if not use_kernels(weights, *momentum, q, k, v, gamma, eta, alpha, theta):
        return chunk_scan_reference(q, k, v, gamma, eta, alpha, theta, state, chunk_size, optimizer, ns_steps,
                                    kernel_settings().ns_precision)
    try:
        reads, weights, momentum, (tk, tv, tg) = kernels.chunk_scan(
            q, k, v, gamma, eta, alpha, theta, weights, momentum, state["tail_k"], state["tail_v"],
            state["tail_gamma"], chunk_size=chunk_size, optimizer=optimizer, ns_steps=ns_steps,
            precision=kernel_settings().kernel_precision)
    except kernels.KernelResourceError as exc:
        _log.warning("fused chunk kernel unavailable, using the reference: %s", exc)
        return chunk_scan_reference(q, k, v, gamma, eta, alpha, theta, state, chunk_size, optimizer, ns_steps,
                                    kernel_settings().ns_precision)
    new = _memory_entries(names, weights, momentum, (tk, tv, tg))
    return reads, new


# ---------------------------------------------------------------------------------------------
# The streaming layer
# ---------------------------------------------------------------------------------------------


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's recurrent state: the wider of the activation dtype and fp32 (bf16 and
    fp16 models keep an fp32 state; float64 stays float64). docs/model.md, "Precision"."""
    return torch.promote_types(dtype, torch.float32)


def _sigmoid(x: Tensor) -> Tensor:
    """The gates' sigmoid in float64, cast to the state dtype (never below fp32: a retention of
    sigmoid(6) = 0.9975 would round to 0.996 or 1 in bf16)."""
    return torch.sigmoid(x.double()).to(state_dtype(x.dtype))


def head_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of x (B, H, T, d) with a per-head weight (H, d)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight[None, :, None, :].to(x.dtype)


class AtlasMemory(nn.Module):
    """One ATLAS memory layer (all heads): projections, gates, reads and the chunk recurrence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.first_order = False  # training option, see chunk_update
        # Training: when a list, every committed chunk's gates (B, H, 3: eta / eta_max, alpha,
        # theta) are appended to it, for the costs on writing and forgetting (training.GateConfig).
        self.gate_log: list[Tensor] | None = None
        d_model, h, d, e = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mem_hidden
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Parameter(torch.empty(3 * d_model, cfg.conv_kernel))
        self.gates = nn.Linear(d_model, 4 * h)  # eta, alpha, theta, gamma logits per head
        self.phi = nn.Parameter(torch.tensor([1 / math.factorial(i) for i in range(1, cfg.poly_degree + 1)])
                                .repeat(h, 1))
        if cfg.mem_depth == 2:
            self.w1_init = nn.Parameter(torch.zeros(h, d, e))  # zero: memory starts as the identity
            self.w2_init = nn.Parameter(torch.randn(h, e, d) / math.sqrt(d))
        else:
            self.w_init = nn.Parameter(torch.zeros(h, d, d))
        self.norm = nn.Parameter(torch.ones(h, d))
        self.reset_gates()
        nn.init.uniform_(self.conv, -1 / math.sqrt(cfg.conv_kernel), 1 / math.sqrt(cfg.conv_kernel))

    def reset_gates(self) -> None:
        c, h = self.cfg, self.cfg.n_heads
        nn.init.normal_(self.gates.weight, std=0.02)
        with torch.no_grad():
            bias = torch.tensor([c.eta_bias_init, c.alpha_bias_init, c.theta_bias_init, c.gamma_bias_init])
            self.gates.bias.copy_(bias.repeat_interleave(h))

    # -- state -------------------------------------------------------------------------------

    def init_weights(self) -> Weights:
        return (self.w1_init, self.w2_init) if self.cfg.mem_depth == 2 else (self.w_init,)

    def init_state(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Fresh state; `dtype` is the activation dtype. Every tensor that is saved (W, S, the Omega
        tail, the conv tail) is in the state dtype (at least fp32); the decode cache `cache_conv`
        is in the activation dtype."""
        c = self.cfg
        h, d, tail = c.n_heads, c.head_dim, c.omega_window - 1
        wdtype = state_dtype(dtype)
        dev = self.conv.device
        st: dict[str, Tensor] = {}
        for name, w0 in zip(self._names, self.init_weights(), strict=True):
            # Materialised, not an expanded view: matrix products choose kernels by memory layout,
            # and a state must compute the same bits whether fresh, stacked or restored.
            st[name] = w0.to(wdtype)[None].repeat(batch, *([1] * w0.dim()))
            if c.optimizer != "gd":
                st["S" + name[1:]] = torch.zeros(batch, *w0.shape, dtype=wdtype, device=dev)
        z = lambda *s, dt=wdtype: torch.zeros(batch, *s, dtype=dt, device=dev)
        st.update(tail_k=z(h, tail, d), tail_v=z(h, tail, d), tail_gamma=z(h, tail),
                  conv=z(c.conv_kernel - 1, 3 * c.d_model),
                  cache_conv=z(c.conv_kernel - 1, c.d_model, dt=dtype))
        return st

    @property
    def _names(self) -> tuple[str, ...]:
        return ("W1", "W2") if self.cfg.mem_depth == 2 else ("W",)

    # -- forward -----------------------------------------------------------------------------

    def project(self, x: Tensor, conv_tail: Tensor) -> tuple[Tensor, ...]:
        """Per-token features: phi(q), phi(k), v (B, H, T, d), gate logits (B, H, T, 4), the new conv
        tail (in the conv tail's dtype), and the raw projections after the conv tail's (B, K-1+T, 3D)
        (the decode cache keeps the queries of the last of them). The saved conv tail holds earlier
        projections exactly, so it is cast back losslessly."""
        c = self.cfg
        bsz, t, _ = x.shape
        zx = self.qkv(x)
        z = torch.cat([conv_tail.to(zx.dtype), zx], dim=1)
        conv = F.conv1d(z.transpose(1, 2), self.conv[:, None, :], groups=z.shape[-1]).transpose(1, 2)
        new_tail = z[:, z.shape[1] - (c.conv_kernel - 1):].to(conv_tail.dtype)
        q, k, v = F.silu(conv).view(bsz, t, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logits = self.gates(x).view(bsz, t, 4, c.n_heads).permute(0, 3, 1, 2)
        return feature_map(q, self.phi), feature_map(k, self.phi), v, logits, new_tail, z

    def decode(self, x: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One new token per session (x (B, 1, D)) inside an unfinished chunk: a read, no optimiser
        step, so only queries are projected; the decode cache holds the last k-1 of them (raw)."""
        c, bsz = self.cfg, x.shape[0]
        window = torch.cat([st["cache_conv"], F.linear(x, self.qkv.weight[:c.d_model])], dim=1)  # (B, k, D)
        conv = torch.einsum("bkc,ck->bc", window, self.conv[:c.d_model])[:, None]
        q = F.silu(conv).view(bsz, 1, c.n_heads, c.head_dim).transpose(1, 2)
        fq = feature_map(F.normalize(q, dim=-1), self.phi)
        weights = tuple(st[n] for n in self._names)
        out = head_rms_norm(read_step(weights, fq).to(x.dtype), self.norm, c.norm_eps)
        return out, {"cache_conv": window[:, 1:]}

    def forward(self, x: Tensor, st: dict[str, Tensor], commit: Tensor,
                ends: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One chunk block. x (B, L, D): the normed inputs of each session's current chunk (L <= b
        rows; rows past a session's stream are padding, harmless since everything is causal).
        commit (B,): sessions whose chunk is complete (then L == b); only they take the optimiser
        step and advance their state. ends (B,): each session's last real row in the block (-1 if
        none), which sets its decode cache. Returns the per-head-normed reads (B, H, L, d) and the
        state."""
        c = self.cfg
        fq, fk, v, logits, conv_tail, z = self.project(x, st["conv"])
        names = self._names
        weights = tuple(st[n] for n in names)
        # Every token of a chunk reads the memory as it stood at the chunk's start.
        out = head_rms_norm(memory_read(weights, fq).to(x.dtype), self.norm, c.norm_eps)
        rows = ends[:, None] + 1 + torch.arange(c.conv_kernel - 1, device=x.device)
        zq = z[..., :c.d_model]  # decode reads the memory, so it convolves only the queries
        cache = {"cache_conv": torch.gather(zq, 1, rows[..., None].expand(-1, -1, c.d_model))}
        if not bool(commit.any()):
            new = dict(st)
            new.update(cache)
            return out, new
        if x.shape[1] != c.chunk_size:
            raise ValueError("a committed chunk must have chunk_size rows")
        # Gates of the whole batch in one layout before any selection, the sigmoids in float64:
        # elementwise exp rounds differently on vectorised and scalar paths, and the choice
        # depends on layout and size; this keeps a session's bits independent of its batch.
        # The chunk means and the gates are in the state dtype (at least fp32).
        wdtype = weights[0].dtype
        logits = logits.to(wdtype)
        gamma = _sigmoid(logits[..., 3])
        chunk_gates = _sigmoid(logits[..., :3].mean(dim=2))
        idx = None if bool(commit.all()) else commit.nonzero().squeeze(1)
        sel = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        put = (lambda old, upd: upd) if idx is None else (lambda old, upd: old.index_copy(0, idx, upd))

        # The Omega inputs in the state dtype: the gradients are formed in it anyway (memory_grads),
        # and the tail that carries them to the next chunk is saved in it.
        counts = omega_counts(c.chunk_size, c.omega_window, wdtype, fk.device)
        keys = torch.cat([sel(st["tail_k"]), sel(fk).to(wdtype)], dim=2)
        vals = torch.cat([sel(st["tail_v"]), sel(v).to(wdtype)], dim=2)
        gammas = torch.cat([sel(st["tail_gamma"]), sel(gamma)], dim=2)
        eta, alpha, theta = sel(chunk_gates).unbind(-1)
        if self.gate_log is not None:
            self.gate_log.append(sel(chunk_gates))
        momentum = tuple(sel(st["S" + n[1:]]) for n in names) if c.optimizer != "gd" else ()
        new_w, new_s = chunk_step(tuple(sel(w) for w in weights), momentum, keys, vals, gammas * counts,
                                  eta * c.eta_max, alpha, theta, c.optimizer, c.ns_steps,
                                  first_order=self.first_order and torch.is_grad_enabled())
        new = dict(st)
        new.update(cache)
        tail = c.omega_window - 1
        new["tail_k"] = put(st["tail_k"], keys[:, :, keys.shape[2] - tail:])
        new["tail_v"] = put(st["tail_v"], vals[:, :, vals.shape[2] - tail:])
        new["tail_gamma"] = put(st["tail_gamma"], gammas[:, :, gammas.shape[2] - tail:])
        new["conv"] = put(st["conv"], sel(conv_tail))
        for n, w, s in zip(names, new_w, new_s or [None] * len(names), strict=True):
            new[n] = put(st[n], w)
            if s is not None:
                new["S" + n[1:]] = put(st["S" + n[1:]], s)
        return out, new
