"""Plain PyTorch versions of the kernels' entry points, with the same signatures and the same math
(MODEL.md; the engine's `engine/model/memory.py` is the specification and the tests pin both this file
and the kernels to it). Readable, float64-capable, and what the kernels are debugged against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = tuple[Tensor, ...]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def memory_read(weights: Weights, x: Tensor) -> Tensor:
    x = x.to(weights[0].dtype)
    if len(weights) == 1:
        return x @ weights[0].mT
    return x + F.gelu(x @ weights[1].mT, approximate="tanh") @ weights[0].mT


def _gelu_grad(h: Tensor) -> Tensor:
    t = torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))
    return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * h * h)


def _grads(weights: Weights, x: Tensor, v: Tensor, omega: Tensor) -> Weights:
    err = (memory_read(weights, x) - v) * omega[..., None]
    if len(weights) == 1:
        return (err.mT @ x,)
    w1, w2 = weights
    h = x @ w2.mT
    return (err.mT @ F.gelu(h, approximate="tanh"), ((err @ w1) * _gelu_grad(h)).mT @ x)


def _newton_schulz(s: Tensor, steps: int) -> Tensor:
    rows, cols = s.shape[-2:]
    x = s.mT if rows > cols else s
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    n1, n2, n3 = NS_COEFFS
    for _ in range(steps):
        a = x @ x.mT
        x = n1 * x + (n2 * a + n3 * a @ a) @ x
    return (x.mT if rows > cols else x) * math.sqrt(max(1.0, rows / cols))


def chunk_update(weights: Weights, momentum: Weights, x: Tensor, v: Tensor, omega: Tensor, eta: Tensor,
                 alpha: Tensor, theta: Tensor, optimizer: str, ns_steps: int) -> tuple[Weights, Weights]:
    dt = torch.promote_types(weights[0].dtype, torch.float32)
    weights = tuple(w.to(dt) for w in weights)
    grads = _grads(weights, x.to(dt), v.to(dt), omega.to(dt))
    eta, alpha, theta = (g.to(dt)[..., None, None] for g in (eta, alpha, theta))
    new_w, new_s = [], []
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        step = g
        if optimizer != "gd":
            step = theta * momentum[i].to(dt) + g
            new_s.append(step)
            if optimizer == "muon":
                step = _newton_schulz(step, ns_steps)
        new_w.append(alpha * w - eta * step)
    return tuple(new_w), tuple(new_s)


def omega_counts(chunk: int, tail: int) -> list[int]:
    """Multiplicity of key row r (tail rows first) in the chunk's Omega objective, window c = tail + 1."""
    return [max(0, min(chunk - 1, r) - max(0, r - tail) + 1) for r in range(chunk + tail)]


def chunk_scan(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, alpha: Tensor, theta: Tensor,
               weights: Weights, momentum: Weights, tail_k: Tensor, tail_v: Tensor, tail_gamma: Tensor, *,
               chunk_size: int, optimizer: str, ns_steps: int,
               **_: object) -> tuple[Tensor, Weights, Weights, tuple[Tensor, Tensor, Tensor]]:
    """The fused kernel's function (kernels/chunk.py `chunk_scan`), chunk by chunk."""
    b, t, tail = chunk_size, k.shape[2], tail_k.shape[2]
    n_full = t // b
    cnt = torch.tensor(omega_counts(b, tail), dtype=gamma.dtype, device=gamma.device)
    reads = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    w, s = tuple(weights), tuple(momentum)
    for j in range(-(-t // b)):
        sl = slice(j * b, min(t, (j + 1) * b))
        reads[:, :, sl] = memory_read(w, q[:, :, sl]).to(q.dtype)
        if j == n_full:
            break
        keys, vals = torch.cat([tail_k, k[:, :, sl]], 2), torch.cat([tail_v, v[:, :, sl]], 2)
        gammas = torch.cat([tail_gamma, gamma[:, :, sl]], 2)
        w, s = chunk_update(w, s, keys, vals, gammas * cnt, eta[..., j], alpha[..., j], theta[..., j],
                            optimizer, ns_steps)
        n = keys.shape[2]
        tail_k, tail_v, tail_gamma = keys[:, :, n - tail:], vals[:, :, n - tail:], gammas[:, :, n - tail:]
    return reads, w, s, (tail_k, tail_v, tail_gamma)
