"""The ATLAS language model: pre-norm blocks whose mixer is ATLAS memory, sliding-window attention,
or both (MAG), and a SwiGLU MLP. The model is functional over a flat dict of state tensors with the
session batch first; `engine.state.SessionState` wraps that dict for users."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import SlidingWindowAttention
from .memory import AtlasMemory, head_rms_norm

StateDict = dict[str, Tensor]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Mixer(nn.Module):
    """"atlas": memory only; "swa": attention only; "mag": both on the same input, combined as
    W_o(norm(y_swa) * sigmoid(y_mem)) ("gate") or W_o(norm(y_swa) + y_mem) ("add"); y_mem is
    already RMS-normed per head by the memory layer."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.mem = AtlasMemory(cfg) if kind in ("atlas", "mag") else None
        self.attn = SlidingWindowAttention(cfg) if kind in ("swa", "mag") else None
        self.attn_norm = nn.Parameter(torch.ones(cfg.n_heads, cfg.head_dim)) if kind == "mag" else None
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def init_state(self, batch: int, dtype: torch.dtype) -> StateDict:
        st: StateDict = {}
        for name, part in (("mem", self.mem), ("attn", self.attn)):
            if part is not None:
                st.update({f"{name}.{k}": v for k, v in part.init_state(batch, dtype).items()})
        return st

    def forward(self, x: Tensor, st: StateDict, pos: Tensor) -> tuple[Tensor, StateDict]:
        c = self.cfg
        new: StateDict = {}
        y_mem = y_attn = None
        if self.mem is not None:
            sub = {k[4:]: v for k, v in st.items() if k.startswith("mem.")}
            y_mem, sub = self.mem(x, sub, pos % c.chunk_size)
            new.update({f"mem.{k}": v for k, v in sub.items()})
        if self.attn is not None:
            sub = {k[5:]: v for k, v in st.items() if k.startswith("attn.")}
            y_attn, sub = self.attn(x, sub, pos)
            new.update({f"attn.{k}": v for k, v in sub.items()})
        if y_mem is None:
            y = y_attn
        elif y_attn is None:
            y = y_mem
        else:
            y_attn = head_rms_norm(y_attn, self.attn_norm, c.norm_eps)
            y = y_attn * torch.sigmoid(y_mem) if c.mag_combine == "gate" else y_attn + y_mem
        bsz, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(bsz, t, c.d_model)), new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = Mixer(cfg, kind)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: Tensor, st: StateDict, pos: Tensor) -> tuple[Tensor, StateDict]:
        y, st = self.mixer(self.norm1(x), st, pos)
        x = x + y
        return x + self.mlp(self.norm2(x)), st


class AtlasModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.mixers)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """nanoGPT-style: N(0, 0.02), residual output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.endswith("gates.weight"):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("out.weight", "down.weight")) \
                    else 0.02
                nn.init.normal_(p, std=std)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch: int = 1, position: int = 0) -> StateDict:
        """A fresh state for `batch` sessions whose first token sits at absolute `position`."""
        dev = self.device
        st: StateDict = {
            "pos": torch.full((batch,), position, dtype=torch.int64, device=dev),
            "tokens": torch.zeros(batch, dtype=torch.int64, device=dev),
            "last_logits": torch.zeros(batch, self.cfg.vocab_size,
                                       dtype=torch.promote_types(self.dtype, torch.float32), device=dev),
        }
        for i, block in enumerate(self.blocks):
            st.update({f"layers.{i}.{k}": v for k, v in block.mixer.init_state(batch, self.dtype).items()})
        return st

    def forward(self, tokens: Tensor, state: StateDict, all_logits: bool = True) -> tuple[Tensor, StateDict]:
        """Feed tokens (B, T) into the sessions of `state`. Returns logits (B, T, V) (or (B, 1, V) of
        the last position when all_logits is False) and the new state; `state` is not modified."""
        bsz, t = tokens.shape
        pos = state["pos"]
        x = self.embed(tokens)
        new: StateDict = {}
        for i, block in enumerate(self.blocks):
            prefix = f"layers.{i}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            x, sub = block(x, sub, pos)
            new.update({prefix + k: v for k, v in sub.items()})
        if not all_logits:
            x = x[:, -1:]
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        new["pos"] = pos + t
        new["tokens"] = state["tokens"] + t
        new["last_logits"] = logits[:, -1].to(state["last_logits"].dtype) if t else state["last_logits"]
        return logits, new
