"""The recurrent state of one or more sessions, and its byte format.

A state is a flat dict of tensors with the session batch first (the model defines the keys), plus
the fingerprint of the model that made it. Its size is fixed by the model config, whatever the
number of tokens read. The model never writes a state tensor in place, so a fork is a shallow copy
(copy-on-write for free) and a state can be shared between requests safely.

With a tokenizer.json, a state also holds the tail of its document whose tokens may still change
(`held_text`, `held_len`: docs/formats.md, "Held-back text"); the model never touches them.

Byte format: safetensors (never pickle). The header metadata holds only fixed-width strings
(format version, fingerprint), and the counters are tensors, so the byte size of a state is the
same after 100 tokens as after 10 million.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .tokenizer import CONTEXT_BYTES, HOLD_BYTES, HeldText

FORMAT = "atlas-state/1"

#: The held-back text of a model with a tokenizer.json (docs/formats.md, "Held-back text"): a byte
#: buffer (B, CONTEXT_BYTES + HOLD_BYTES) holding the context then the held text, zeros after them,
#: and their two lengths (B, 2). A byte-level model's states have neither.
HELD_TEXT = "held_text"
HELD_LEN = "held_len"
HELD_KEYS = (HELD_TEXT, HELD_LEN)


def held_tensors(batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The held-back text of `batch` sessions that hold nothing."""
    return {HELD_TEXT: torch.zeros(batch, CONTEXT_BYTES + HOLD_BYTES, dtype=torch.uint8, device=device),
            HELD_LEN: torch.zeros(batch, 2, dtype=torch.int64, device=device)}


def carry_held(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """`new` (a state dict the model made from `old`) with the held-back text of `old`, which the
    model neither reads nor keeps."""
    return dict(new, **{k: old[k] for k in HELD_KEYS if k in old}) if HELD_LEN in old else new


def is_cache_key(key: str) -> bool:
    """Decode-cache tensors: derivable from the rest, kept in memory, never serialised or compared."""
    return key.rsplit(".", 1)[-1].startswith("cache")


class StateError(ValueError):
    """A state's bytes cannot be used. `code` is stable and reaches API clients."""

    code = "state_invalid"


class StateFormatError(StateError):
    code = "state_corrupt"


class ForeignStateError(StateError):
    code = "foreign_model"


#: The largest magnitude a state's floating tensor may hold. The model's own values stay many orders
#: below it; a square of a larger one (a norm, Newton-Schulz) overflows fp32 (3.4e38) to inf.
MAX_STATE_ABS = 1e12


def check_values(tensors: dict[str, Tensor], vocab_size: int | None = None,
                 chunk_size: int | None = None) -> None:
    """Refuse (StateFormatError naming the tensor) a state whose values the model cannot step: a
    floating tensor with a non-finite value or one past MAX_STATE_ABS, a negative counter, a pending
    token id outside the vocabulary (when `vocab_size` is given), a cache length or attention ring
    position out of range. One pass over each tensor; call it on the state's own device."""
    for k, v in tensors.items():
        if v.is_floating_point() and v.numel() and not bool((v.abs() <= MAX_STATE_ABS).all()):
            what = "non-finite values" if not bool(torch.isfinite(v).all()) else \
                f"values past {MAX_STATE_ABS:g} in magnitude"
            raise StateFormatError(f"state tensor {k!r} holds {what}")
    pos, tokens = tensors.get("pos"), tensors.get("tokens")
    for k in ("pos", "tokens", "cache_len"):
        if k in tensors and bool((tensors[k] < 0).any()):
            raise StateFormatError(f"state tensor {k!r} holds a negative count")
    pending = tensors.get("pending")
    if pending is not None and pending.numel():
        if bool((pending < 0).any()) or (vocab_size is not None and bool((pending >= vocab_size).any())):
            raise StateFormatError(f"state tensor 'pending' holds a token id outside the vocabulary "
                                   f"(size {vocab_size})")
    b = chunk_size if chunk_size is not None else (int(pending.shape[1]) if pending is not None else None)
    if pos is not None and tokens is not None and b and bool((pos < tokens % b).any()):
        raise StateFormatError("state tensor 'pos' is before the start of its chunk")
    if "cache_len" in tensors and b and bool((tensors["cache_len"] > b).any()):
        raise StateFormatError(f"state tensor 'cache_len' is past the chunk size {b}")
    for k, v in tensors.items():
        if k.endswith("ring_pos") and v.numel() and (
                bool((v < -1).any()) or (pos is not None and bool((v >= pos[:, None]).any()))):
            raise StateFormatError(f"state tensor {k!r} holds a position out of range")


@dataclass(frozen=True)
class SessionState:
    tensors: dict[str, Tensor]
    fingerprint: str

    # -- shape -------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return int(self.tensors["pos"].shape[0])

    @property
    def device(self) -> torch.device:
        return self.tensors["pos"].device

    @property
    def nbytes(self) -> int:
        """Bytes the state holds (shared storage counted once per tensor view)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def tokens(self) -> list[int]:
        """Tokens read by each session."""
        return self.tensors["tokens"].tolist()

    @property
    def last_logits(self) -> Tensor:
        return self.tensors["last_logits"]

    # -- copies and batches --------------------------------------------------------------------

    def fork(self) -> SessionState:
        """A cheap copy: tensors are shared, and nothing ever writes them in place."""
        return SessionState(dict(self.tensors), self.fingerprint)

    def __getitem__(self, i: int) -> SessionState:
        return SessionState({k: v[i:i + 1] for k, v in self.tensors.items()}, self.fingerprint)

    def select(self, index: Tensor) -> SessionState:
        """The sessions at `index` (a new copy, not views)."""
        return SessionState({k: v.index_select(0, index) for k, v in self.tensors.items()}, self.fingerprint)

    @property
    def cache_valid(self) -> bool:
        """Whether the decode cache holds every session's unfinished chunk."""
        t = self.tensors
        b = t["pending"].shape[1]
        return bool((t["cache_len"] == t["tokens"] % b).all())

    @property
    def holds_text(self) -> bool:
        """Whether the state has the held-back text tensors (a model with a tokenizer.json)."""
        return HELD_LEN in self.tensors

    def held(self) -> HeldText:
        """The held-back text of a one-session state (empty without the tensors)."""
        if not self.holds_text:
            return HeldText()
        n_ctx, n_text = (int(x) for x in self.tensors[HELD_LEN][0].tolist())
        buf = bytes(self.tensors[HELD_TEXT][0, :n_ctx + n_text].cpu().tolist())
        return HeldText(buf[:n_ctx], buf[n_ctx:])

    def with_held(self, held: HeldText) -> SessionState:
        """A copy of a one-session state that holds `held` back (the tensors are new, the rest shared)."""
        if self.batch_size != 1:
            raise ValueError("with_held takes a one-session state")
        if not self.holds_text:
            if held.context or held.text:
                raise ValueError("this state has no room for held-back text (a byte-level model)")
            return self
        if len(held.context) > CONTEXT_BYTES or len(held.text) > HOLD_BYTES:
            raise ValueError("held-back text over its bound")
        data = held.context + held.text
        buf = torch.zeros_like(self.tensors[HELD_TEXT])
        if data:
            buf[0, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(buf.device)
        lens = torch.tensor([[len(held.context), len(held.text)]], dtype=torch.int64, device=buf.device)
        return SessionState(dict(self.tensors, **{HELD_TEXT: buf, HELD_LEN: lens}), self.fingerprint)

    def split(self) -> list[SessionState]:
        return [self[i] for i in range(self.batch_size)]

    @staticmethod
    def stack(states: Iterable[SessionState]) -> SessionState:
        states = list(states)
        if not states:
            raise ValueError("nothing to stack")
        fps = {s.fingerprint for s in states}
        if len(fps) != 1:
            raise ForeignStateError("states from different models cannot share a batch")
        keys = states[0].tensors.keys()
        tensors = {k: torch.cat([s.tensors[k] for s in states]) for k in keys}
        return SessionState(tensors, states[0].fingerprint)

    def to(self, device: torch.device | str) -> SessionState:
        return SessionState({k: v.to(device) for k, v in self.tensors.items()}, self.fingerprint)

    def equal(self, other: SessionState) -> bool:
        """Bit-exact equality of every serialised tensor (and the model); decode caches are ignored."""
        if self.fingerprint != other.fingerprint or self.tensors.keys() != other.tensors.keys():
            return False
        return all(torch.equal(v.cpu(), other.tensors[k].cpu())
                   for k, v in self.tensors.items() if not is_cache_key(k))

    # -- bytes -----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items() if not is_cache_key(k)}
        # One metadata entry: safetensors writes several in hash order, and state bytes must be
        # deterministic (equal states are equal bytes).
        manifest = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint}, sort_keys=True)
        return st_save(tensors, metadata={"atlas": manifest})

    @classmethod
    def from_bytes(cls, data: bytes, expected_fingerprint: str | None = None,
                   device: torch.device | str = "cpu") -> SessionState:
        """Parse state bytes; refuses unknown formats and (when given) states of another model."""
        try:
            tensors = st_load(bytes(data))
            meta = _read_metadata(data)
        except (SafetensorError, ValueError, KeyError, TypeError, struct.error) as e:
            raise StateFormatError(f"state bytes are not a valid {FORMAT} file: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise StateFormatError(f"unknown state format {got!r} (expected {FORMAT})")
        fp = meta.get("fingerprint", "")
        if not isinstance(fp, str):
            raise StateFormatError("state manifest has no valid fingerprint")
        if expected_fingerprint is not None and fp != expected_fingerprint:
            raise ForeignStateError(
                f"state was made by model {fp[:16]}..., this server runs {expected_fingerprint[:16]}...")
        if "pos" not in tensors:
            raise StateFormatError("state bytes lack the position counter")
        if HELD_LEN in tensors:
            lens = tensors[HELD_LEN]
            if lens.dim() != 2 or lens.shape[1] != 2 or bool((lens < 0).any()) \
                    or bool((lens[:, 0] > CONTEXT_BYTES).any()) or bool((lens[:, 1] > HOLD_BYTES).any()):
                raise StateFormatError("state bytes hold back text past its bound")
        return cls({k: v.to(device) for k, v in tensors.items()}, fp)


def _read_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header longer than the data")
    meta = json.loads(bytes(data[8:8 + n])).get("__metadata__", {}) or {}
    return json.loads(meta.get("atlas", "{}"))
