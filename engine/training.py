"""Training small ATLAS models: next-token loss through the chunk recurrence (autograd flows through
every memory update), AdamW with warm-up and cosine decay, gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from .model import AtlasModel


class OptimConfig(BaseModel):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


def lm_loss(model: AtlasModel, tokens: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of tokens (B, T) from a fresh state; loss_mask (B, T-1) selects
    which predicted positions count."""
    logits, _ = model(tokens[:, :-1], model.init_state(tokens.shape[0]))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    if loss_mask is None:
        return loss.mean()
    mask = loss_mask.flatten().to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def make_optimizer(model: AtlasModel, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, gates' biases, feature-map coefficients)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("_init")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("_init"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: AtlasModel, batches: Iterator[tuple[Tensor, Tensor | None]], steps: int,
          cfg: OptimConfig | None = None) -> list[float]:
    """Run `steps` optimiser steps over (tokens, loss_mask) batches; returns the loss per step."""
    cfg = cfg or OptimConfig()
    opt = make_optimizer(model, cfg)
    model.train()
    losses = []
    for step in range(steps):
        tokens, mask = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg)
        loss = lm_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
