"""The ATLAS long-term memory layer: projections, gates, reads and the chunk recurrence of a stream.

`AtlasMemory` runs one chunk block of a stream through the chunk step and carries the state (weights,
momentum, Omega tail, conv tail) from chunk to chunk; the LM drives it on the absolute chunk grid.
The step itself is the reference in reference_step.py (docs/model.md, "One ATLAS memory layer"), or
the fused Triton kernel that mirrors it where `use_kernels` says so.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas import kernels
from atlas.kernels.settings import kernel_settings

from ..config import ModelConfig
from .reference_step import (
    Weights,
    chunk_scan_reference,
    chunk_update,
    feature_map,
    memory_entries,
    memory_of,
    memory_read,
    omega_counts,
    outside_autocast,
)

_log = logging.getLogger(__name__)


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
    names, weights, momentum = memory_of(state, optimizer)
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
    new = memory_entries(names, weights, momentum, (tk, tv, tg))
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


def causal_conv(z: Tensor, weight: Tensor) -> Tensor:
    """The depthwise causal convolution: out[:, t] = sum_j weight[:, j] * z[:, t + j] for z (B, K-1+T, C)
    (the K-1 earlier rows first) and weight (C, K); returns (B, T, C).

    As K multiply-adds over shifted views, in this order: on CPU, conv1d of so few taps costs
    several times more, and two transposed copies. One row (decode) is one reduction: there the
    cost is the number of calls."""
    taps, t = weight.shape[1], z.shape[1] - weight.shape[1] + 1
    if t == 1:
        return torch.einsum("bkc,ck->bc", z, weight)[:, None]
    w = weight.T.contiguous()  # each tap's (C,) row contiguous, as the broadcast wants it
    out = z[:, :t] * w[0]
    for j in range(1, taps):
        out = torch.addcmul(out, z[:, j:j + t], w[j])
    return out


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
        new_tail = z[:, z.shape[1] - (c.conv_kernel - 1):].to(conv_tail.dtype)
        act = F.silu(causal_conv(z, self.conv)).view(bsz, t, 3, c.n_heads, c.head_dim)
        # Normalised in the token-major layout, where each head's row is contiguous.
        q, k = F.normalize(act[:, :, :2], dim=-1).permute(2, 0, 3, 1, 4)
        v = act[:, :, 2].transpose(1, 2)
        logits = self.gates(x).view(bsz, t, 4, c.n_heads).permute(0, 3, 1, 2)
        return feature_map(q, self.phi), feature_map(k, self.phi), v, logits, new_tail, z

    def decode(self, x: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One new token per session (x (B, 1, D)) inside an unfinished chunk: a read, no optimiser
        step, so only queries are projected; the decode cache holds the last k-1 of them (raw)."""
        c, bsz = self.cfg, x.shape[0]
        window = torch.cat([st["cache_conv"], F.linear(x, self.qkv.weight[:c.d_model])], dim=1)  # (B, k, D)
        q = F.silu(causal_conv(window, self.conv[:c.d_model]))
        q = q.view(bsz, 1, c.n_heads, c.head_dim).transpose(1, 2)
        fq = feature_map(F.normalize(q, dim=-1), self.phi)
        weights = tuple(st[n] for n in self._names)
        out = head_rms_norm(read_step(weights, fq).to(x.dtype), self.norm, c.norm_eps)
        return out, {"cache_conv": window[:, 1:]}

    def forward(self, x: Tensor, st: dict[str, Tensor], commit: Tensor,
                ends: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One chunk block, or a span of whole chunks. x (B, L, D): the normed inputs of each
        session's current chunk (L <= b rows; rows past a session's stream are padding, harmless
        since everything is causal), or of n >= 2 whole chunks (L = n b) that every session commits.
        commit (B,): sessions whose chunk is complete (then L == b); only they take the optimiser
        step and advance their state. ends (B,): each session's last real row in the block (-1 if
        none), which sets its decode cache. Returns the per-head-normed reads (B, H, L, d) and the
        state.

        A span projects and normalises all its rows at once and steps the memory chunk by chunk:
        every chunk sees the values and shapes it would see as a block of its own, only the
        row-wise operations see more rows (docs/model.md, "Streaming on the absolute chunk grid")."""
        c, b = self.cfg, self.cfg.chunk_size
        n_chunks = x.shape[1] // b if x.shape[1] > b else 1
        if n_chunks > 1 and (x.shape[1] != n_chunks * b or not bool(commit.all())):
            raise ValueError("a span of several chunks must be whole chunks that every session commits")
        fq, fk, v, logits, conv_tail, z = self.project(x, st["conv"])
        names = self._names
        weights = tuple(st[n] for n in names)
        rows = ends[:, None] + 1 + torch.arange(c.conv_kernel - 1, device=x.device)
        zq = z[..., :c.d_model]  # decode reads the memory, so it convolves only the queries
        cache = {"cache_conv": torch.gather(zq, 1, rows[..., None].expand(-1, -1, c.d_model))}
        if not bool(commit.any()):
            # Every token of a chunk reads the memory as it stood at the chunk's start.
            out = head_rms_norm(memory_read(weights, fq).to(x.dtype), self.norm, c.norm_eps)
            new = dict(st)
            new.update(cache)
            return out, new
        if x.shape[1] % b:
            raise ValueError("a committed chunk must have chunk_size rows")
        # The committing sessions, once for the block (None: all of them).
        idx = None if bool(commit.all()) else commit.nonzero().squeeze(1)
        new = dict(st)
        reads = []
        for j in range(n_chunks):
            sl = slice(j * b, (j + 1) * b) if n_chunks > 1 else slice(None)
            weights = tuple(new[n] for n in names)
            reads.append(memory_read(weights, fq[:, :, sl]))
            new.update(self._commit(new, idx, fk[:, :, sl], v[:, :, sl], logits[:, :, sl]))
        new.update(cache, conv=conv_tail if idx is None else st["conv"].index_copy(0, idx, conv_tail[idx]))
        read = reads[0] if n_chunks == 1 else torch.cat(reads, dim=2)
        return head_rms_norm(read.to(x.dtype), self.norm, c.norm_eps), new

    def _commit(self, st: dict[str, Tensor], idx: Tensor | None, fk: Tensor, v: Tensor,
                logits: Tensor) -> dict[str, Tensor]:
        """The optimiser step of one committed chunk for the sessions idx (None: all): phi(k), v
        (B, H, b, d) and the gate logits (B, H, b, 4) of its rows; returns the new weights,
        momentum and Omega tail."""
        c = self.cfg
        names = self._names
        weights = tuple(st[n] for n in names)
        # Gates of the whole batch in one layout before any selection, the sigmoids in float64:
        # elementwise exp rounds differently on vectorised and scalar paths, and the choice
        # depends on layout and size; this keeps a session's bits independent of its batch.
        # The chunk means and the gates are in the state dtype (at least fp32).
        wdtype = weights[0].dtype
        logits = logits.to(wdtype)
        gamma = _sigmoid(logits[..., 3])
        chunk_gates = _sigmoid(logits[..., :3].mean(dim=2))
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
        tail = c.omega_window - 1
        new = {"tail_k": put(st["tail_k"], keys[:, :, keys.shape[2] - tail:]),
               "tail_v": put(st["tail_v"], vals[:, :, vals.shape[2] - tail:]),
               "tail_gamma": put(st["tail_gamma"], gammas[:, :, gammas.shape[2] - tail:])}
        for n, w, s in zip(names, new_w, new_s or [None] * len(names), strict=True):
            new[n] = put(st[n], w)
            if s is not None:
                new["S" + n[1:]] = put(st["S" + n[1:]], s)
        return new
