"""The ATLAS language model: pre-norm blocks whose mixer is ATLAS memory, sliding-window attention,
or both (MAG), and a SwiGLU MLP. The model is functional over a flat dict of state tensors with the
session batch first; `engine.state.SessionState` wraps that dict for users."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..state import is_cache_key
from .attention import SlidingWindowAttention, rope_cos_sin
from .memory import AtlasMemory, head_rms_norm, state_dtype

#: A span's rows (sessions x tokens) times the model's width, at most (`AtlasModel.forward`): 2 MB
#: of fp32 for one row-wise activation, 8,192 rows of the demo model, 2,048 of the default one.
SPAN_ELEMENTS = 1 << 19

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

    def forward(self, x: Tensor, st: StateDict, pos: Tensor, commit: Tensor,
                ends: Tensor) -> tuple[Tensor, StateDict]:
        """One chunk block (see AtlasModel.forward)."""
        return self._mix(x, st, lambda m, sub: m(x, sub, commit, ends), lambda a, sub: a(x, sub, pos, commit))

    def decode(self, x: Tensor, st: StateDict, pos: Tensor, filled: Tensor,
               rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, StateDict]:
        """One token per session inside its unfinished chunk, from the decode cache."""
        return self._mix(x, st, lambda m, sub: m.decode(x, sub),
                         lambda a, sub: a.decode(x, sub, pos, filled, rope))

    def _mix(self, x: Tensor, st: StateDict, run_mem, run_attn) -> tuple[Tensor, StateDict]:
        c = self.cfg
        new, ys = dict(st), {}
        for name, part, run in (("mem", self.mem, run_mem), ("attn", self.attn, run_attn)):
            if part is None:
                continue
            sub = {k[len(name) + 1:]: v for k, v in st.items() if k.startswith(name + ".")}
            ys[name], sub = run(part, sub)
            new.update({f"{name}.{k}": v for k, v in sub.items()})
        y_mem, y_attn = ys.get("mem"), ys.get("attn")
        if y_mem is None:
            y = y_attn
        elif y_attn is None:
            y = y_mem
        else:
            assert self.attn_norm is not None  # "mag" has it
            y_attn = head_rms_norm(y_attn, self.attn_norm, c.norm_eps)
            y = y_attn * torch.sigmoid(y_mem) if c.mag_combine == "gate" else y_attn + y_mem
        assert y is not None  # every kind has memory, attention or both
        bsz, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(bsz, t, c.d_model)), new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = Mixer(cfg, kind)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: Tensor, st: StateDict, pos: Tensor, commit: Tensor,
                ends: Tensor) -> tuple[Tensor, StateDict]:
        y, st = self.mixer(self.norm1(x), st, pos, commit, ends)
        x = x + y
        return x + self.mlp(self.norm2(x)), st

    def decode(self, x: Tensor, st: StateDict, pos: Tensor, filled: Tensor,
               rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, StateDict]:
        y, st = self.mixer.decode(self.norm1(x), st, pos, filled, rope)
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
                residual = name.endswith(("out.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers) if residual else 0.02)

    @property
    def memories(self) -> list[AtlasMemory]:
        """The ATLAS memory layers, in block order."""
        return [block.mixer.mem for block in self._blocks() if block.mixer.mem is not None]

    def _blocks(self) -> Iterator[Block]:
        """The blocks, typed (iterating an nn.ModuleList gives plain Modules)."""
        return cast("Iterator[Block]", iter(self.blocks))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch: int = 1, position: int = 0) -> StateDict:
        """A fresh state for `batch` sessions whose first token sits at absolute `position`. Its
        floating tensors are in the state dtype (at least fp32) whatever the weights' dtype, the
        decode caches (never saved) in the activation dtype."""
        dev, b = self.device, self.cfg.chunk_size
        st: StateDict = {
            "pos": torch.full((batch,), position, dtype=torch.int64, device=dev),
            "tokens": torch.zeros(batch, dtype=torch.int64, device=dev),
            "pending": torch.zeros(batch, b, dtype=torch.int64, device=dev),
            "cache_len": torch.zeros(batch, dtype=torch.int64, device=dev),
            "last_logits": torch.zeros(batch, self.cfg.vocab_size, dtype=state_dtype(self.dtype), device=dev),
        }
        for i, block in enumerate(self._blocks()):
            st.update({f"layers.{i}.{k}": v for k, v in block.mixer.init_state(batch, self.dtype).items()})
        return st

    def _logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)

    def forward(self, tokens: Tensor, state: StateDict, all_logits: bool = True) -> tuple[Tensor, StateDict]:
        """Feed tokens (B, T) into the sessions of `state`; `state` is not modified.

        Returns the logits (B, T, V) of every new token (or (B, V) after the last one when
        all_logits is False) and the new state.

        The stream is computed in blocks on the absolute chunk grid: a session's layer states only
        ever advance by whole chunks, each computed as one block of exactly chunk_size rows, and
        the tokens of its unfinished chunk are kept as ids ("pending") and recomputed with the
        next tokens. So a chunk's arithmetic is the same however the stream was cut, which the
        Muon recurrence needs: Newton-Schulz amplifies rounding along small singular directions,
        and differences that small would otherwise grow over thousands of chunks."""
        bsz, t = tokens.shape
        b, v = self.cfg.chunk_size, self.cfg.vocab_size
        filled = state["tokens"] % b  # ids already pending in each session's current chunk
        if t == 1 and bool(((filled < b - 1) & (state["cache_len"] == filled)).all()):
            return self._decode(tokens, state, filled, all_logits)
        total = filled + t
        stream = torch.cat([state["pending"], tokens], dim=1)
        origin = state["pos"] - filled  # absolute position of the current chunk's first token
        layers = {k: val for k, val in state.items() if k.startswith("layers.")}
        last = state["last_logits"]
        out = last.new_zeros(bsz, t + 1, v) if all_logits else None
        n_rounds = -(-int(total.max()) // b) if t else 0
        blocks = self._plan_blocks(total, n_rounds, tokens.device.type == "cpu" and t > 0)
        for r, n in blocks:
            rows = min(n * b, int(total.max()) - r * b)
            vpos = r * b + torch.arange(rows, device=tokens.device)  # pending ids, then new tokens
            idx = torch.where(vpos < filled[:, None], vpos, b + vpos - filled[:, None]).clamp(max=b + t - 1)
            x = self.embed(torch.gather(stream, 1, idx))
            commit = total >= (r + n) * b
            ends = (total - 1 - r * b).clamp(-1, rows - 1)
            pos = origin[:, None] + vpos
            new_layers: StateDict = {}
            for i, block in enumerate(self._blocks()):
                prefix = f"layers.{i}."
                sub = {k[len(prefix):]: val for k, val in layers.items() if k.startswith(prefix)}
                x, sub = block(x, sub, pos, commit, ends)
                new_layers.update({prefix + k: val for k, val in sub.items()})
            # Sessions still reading in this block take its rows as their decode cache.
            active = total > r * b
            for k, val in new_layers.items():
                if is_cache_key(k):
                    keep = active.view(bsz, *([1] * (val.dim() - 1)))
                    new_layers[k] = torch.where(keep, val, layers[k])
            layers = new_layers
            # The last token of a session in this block sets its last logits.
            row = total - 1 - r * b
            has = (row >= 0) & (row < rows)
            if out is None and not bool(has.any()):
                continue  # no logits wanted from this block: a long ingest skips the output layer
            # Logits of whole chunks (not of single rows), so that a matrix product of the same
            # shape makes them whether the session runs alone or in a batch; of a span's last
            # chunk only, where no others are wanted (a session's last token ends the span).
            first = 0 if out is not None else rows - min(rows, b)
            logits = self._logits(x[:, first:]).to(last.dtype)
            if out is not None:  # all_logits
                tok = vpos[None, :] - filled[:, None]
                tok = torch.where((tok >= 0) & (tok < t), tok, t)  # slot t is a discarded dummy
                out = out.scatter(1, tok[..., None].expand(bsz, rows, v), logits)
            row_logits = logits[torch.arange(bsz), (row - first).clamp(0, rows - first - 1)]
            last = torch.where(has[:, None], row_logits, last)
        pending = self._pending(stream, filled, total)
        new = dict(layers, pos=state["pos"] + t, tokens=state["tokens"] + t, pending=pending,
                   last_logits=last, cache_len=total % b if t else state["cache_len"])
        return (out[:, :t] if out is not None else last), new

    def _plan_blocks(self, total: Tensor, n_rounds: int, spans: bool) -> list[tuple[int, int]]:
        """The blocks (first round, rounds) a forward computes: spans, then rounds of one chunk.

        The rounds every session commits (whole chunks) run as spans, layer by layer: a span
        computes each chunk as its own block would, with the row-wise operations (projections,
        norms, MLPs) taken over all its rows at once (docs/model.md, "Streaming on the absolute
        chunk grid"). `spans` on the CPU only: there a product's rows keep their bits whatever the
        row count (tested); cuBLAS may choose its algorithm by it. A long piece runs as several
        spans of a bounded size: their activations are then reused from the allocator's cache,
        where one span of a 64k-token piece mapped its own afresh and faulted them in page by page
        (half of its time, in the kernel)."""
        b = self.cfg.chunk_size
        whole = int(total.min()) // b if spans else 0
        per_span = max(2, SPAN_ELEMENTS // (total.shape[0] * b * self.cfg.d_model))
        blocks, r = [], 0
        while whole - r > 1:
            n = min(per_span, whole - r)
            blocks.append((r, n))
            r += n
        return blocks + [(q, 1) for q in range(r, n_rounds)]

    def _pending(self, stream: Tensor, filled: Tensor, total: Tensor) -> Tensor:
        """The ids of each session's unfinished chunk (B, chunk_size), zeros past its last token;
        `stream` is the earlier pending ids then the new tokens."""
        b, t = self.cfg.chunk_size, stream.shape[1] - self.cfg.chunk_size
        vpos = (total // b * b)[:, None] + torch.arange(b, device=stream.device)[None, :]
        idx = torch.where(vpos < filled[:, None], vpos, b + vpos - filled[:, None]).clamp(max=b + t - 1)
        return torch.where(vpos < total[:, None], torch.gather(stream, 1, idx), 0)

    def _decode(self, tokens: Tensor, state: StateDict, filled: Tensor,
                all_logits: bool) -> tuple[Tensor, StateDict]:
        """One token per session, none finishing its chunk: only the new row is computed, against
        the decode cache of the chunk's earlier rows. Layer states do not change (no chunk is
        committed), so the exact grid arithmetic of `forward` is untouched; the chunk is computed
        again as a whole block when its last token comes."""
        x = self.embed(tokens)
        pos = state["pos"]
        new = dict(state)
        c = self.cfg
        # Every attention layer rotates by the same position: its cos/sin are made once.
        has_attention = any(kind != "atlas" for kind in c.mixers)
        rope = rope_cos_sin(pos[:, None], c.head_dim, c.rope_base, x.dtype) if has_attention else None
        for i, block in enumerate(self._blocks()):
            prefix = f"layers.{i}."
            sub = {k[len(prefix):]: val for k, val in state.items() if k.startswith(prefix)}
            x, sub = block.decode(x, sub, pos, filled, rope)
            new.update({prefix + k: val for k, val in sub.items()})
        logits = self._logits(x)[:, 0].to(state["last_logits"].dtype)
        new.update(pos=pos + 1, tokens=state["tokens"] + 1, last_logits=logits,
                   pending=state["pending"].scatter(1, filled[:, None], tokens),
                   cache_len=state["cache_len"] + 1)
        return (logits[:, None] if all_logits else logits), new
