"""A session as one file, to export from a server and import into another (docs/formats.md,
"Session files").

The file is safetensors, nothing else: the state's tensors as the store keeps them, and one header
metadata entry ``atlas`` (JSON) that says what they are: ``format`` (``atlas-session/1``), the state
format, the model fingerprint, the session's counters (``tokens``, ``bytes_committed``, the bytes of
held-back text of a tokenizer.json model), its ``name`` and ``metadata``, and ``state_sha256``: the
SHA-256 of the state bytes the tensors make (the canonical ``atlas-state/1`` serialisation, the very
bytes the store holds). Reading a file never unpickles or runs anything: the header is bounded and
parsed as JSON, the tensors are loaded by safetensors, re-serialised, hashed, and checked by the
model's own state checks (names, shapes, dtypes, values) before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .state import FORMAT as STATE_FORMAT
from .state import HELD_LEN, SessionState, StateError

if TYPE_CHECKING:
    from .api import Atlas

FORMAT = "atlas-session/1"
#: A session file's header (tensor table + metadata) is at most this long; the tensors' own bytes
#: are the model's fixed state size.
MAX_HEADER_BYTES = 1 << 20
#: Labels a session may carry (checked on PATCH and on import alike).
MAX_NAME_CHARS = 128
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_BYTES = 4096
#: The largest document offset a session can be resumed from (the ingest route's `offset` bound).
MAX_BYTES_COMMITTED = 1 << 62

MetadataValue = str | int | float | bool | None


class SessionFileError(StateError):
    """A session file that cannot be imported; ``reason`` says which check failed (a metric label):
    truncated, header, format, foreign_model, tensors, values, checksum, counters, labels."""

    code = "invalid_session_file"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ForeignSessionFileError(SessionFileError):
    code = "foreign_model"


def check_name(name: Any) -> str | None:
    """A session name: None, or 1 to MAX_NAME_CHARS printable characters."""
    if name is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a session name is 1 to {MAX_NAME_CHARS} printable characters")
    return name


def check_metadata(metadata: Any) -> dict[str, MetadataValue]:
    """Session metadata: a flat JSON object of at most MAX_METADATA_KEYS keys (each at most
    MAX_METADATA_KEY_CHARS characters) with string, number, boolean or null values, at most
    MAX_METADATA_BYTES bytes as compact UTF-8 JSON."""
    if not isinstance(metadata, dict):
        raise ValueError("metadata is a JSON object")
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata holds at most {MAX_METADATA_KEYS} keys")
    for k, v in metadata.items():
        if not isinstance(k, str) or not 1 <= len(k) <= MAX_METADATA_KEY_CHARS or not k.isprintable():
            raise ValueError(f"metadata keys are 1 to {MAX_METADATA_KEY_CHARS} printable characters")
        if not (v is None or isinstance(v, str | int | float | bool)) or (
                isinstance(v, float) and not math.isfinite(v)):
            raise ValueError("metadata values are strings, finite numbers, booleans or null")
    try:  # as the client sends it: compact, UTF-8 (a lone surrogate, "\ud800", is no text)
        size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError:
        raise ValueError("metadata keys and values are Unicode text (a lone surrogate is not)") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is at most {MAX_METADATA_BYTES} bytes as compact UTF-8 JSON "
                         f"(this is {size})")
    return dict(metadata)


@dataclass(frozen=True)
class SessionFile:
    """What a session file holds, checked: the state (and its canonical bytes) and its labels."""

    state: SessionState
    state_bytes: bytes
    tokens: int
    bytes_committed: int
    name: str | None = None
    metadata: dict[str, MetadataValue] = field(default_factory=dict)


def write(state_bytes: bytes, *, fingerprint: str, tokens: int, bytes_committed: int,
          name: str | None = None, metadata: dict[str, MetadataValue] | None = None) -> bytes:
    """A session file of committed state bytes (``atlas-state/1``) and the session's counters."""
    tensors = st_load(state_bytes)
    held = tensors.get(HELD_LEN)
    info = {"format": FORMAT, "state_format": STATE_FORMAT, "fingerprint": fingerprint, "tokens": tokens,
            "bytes_committed": bytes_committed, "held_bytes": int(held[0, 1]) if held is not None else 0,
            "state_sha256": hashlib.sha256(state_bytes).hexdigest(), "name": name,
            "metadata": metadata or {}}
    return st_save(tensors, metadata={"atlas": json.dumps(info, sort_keys=True)})


def _header(data: bytes) -> dict[str, Any]:
    """The safetensors header, bounded, and a check that the tensors fill the file exactly."""
    if len(data) < 8:
        raise SessionFileError("truncated", "the file is shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise SessionFileError("header", f"the header declares {n} bytes, over {MAX_HEADER_BYTES}")
    if 8 + n > len(data):
        raise SessionFileError("truncated", "the file ends inside its header")
    try:
        header = json.loads(data[8:8 + n])
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise SessionFileError("header", f"unreadable header ({type(e).__name__})") from None
    end = max(ends, default=0)
    if 8 + n + end > len(data):
        raise SessionFileError("truncated", f"the file has {len(data)} bytes, its tensors need {8 + n + end}")
    if 8 + n + end < len(data):
        raise SessionFileError("header", "bytes after the last tensor")
    return header


def _info(header: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    try:
        info = json.loads(header["__metadata__"]["atlas"])
        if not isinstance(info, dict):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise SessionFileError("format", "not an ATLAS session file (no 'atlas' metadata)") from None
    if info.get("format") != FORMAT or info.get("state_format") != STATE_FORMAT:
        raise SessionFileError("format", f"session file format {info.get('format')!r} / state format "
                               f"{info.get('state_format')!r}; this server reads {FORMAT} / {STATE_FORMAT}")
    if info.get("fingerprint") != fingerprint:
        fp = info.get("fingerprint")
        raise ForeignSessionFileError("foreign_model", f"the session is of model {str(fp)[:16]}..., this "
                                      f"server runs {fingerprint[:16]}...")
    for k in ("tokens", "bytes_committed", "held_bytes"):
        if type(info.get(k, 0)) is not int or not 0 <= info.get(k, 0) <= MAX_BYTES_COMMITTED:
            raise SessionFileError("counters", f"{k} is not a count (0 to 2^62)")
    if not isinstance(info.get("state_sha256"), str):
        raise SessionFileError("checksum", "the file carries no state checksum")
    try:
        info["name"] = check_name(info.get("name"))
        info["metadata"] = check_metadata(info.get("metadata", {}))
    except ValueError as e:
        raise SessionFileError("labels", str(e)) from None
    return info


def read(data: bytes, atlas: Atlas) -> SessionFile:
    """Check a session file for ``atlas``'s model; SessionFileError (with its reason) if anything
    is off: truncated, altered, another model or format, unexpected tensors or values."""
    info = _info(_header(data), atlas.fingerprint)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise SessionFileError("tensors", f"the tensors cannot be read: {e}") from None
    state_bytes = SessionState(tensors, atlas.fingerprint).to_bytes()
    if hashlib.sha256(state_bytes).hexdigest() != info["state_sha256"]:
        raise SessionFileError("checksum", "the state does not match its checksum: the file was altered")
    try:
        state = atlas.load_state(state_bytes)  # names, shapes, dtypes and values, as the store's loads
    except StateError as e:
        raise SessionFileError("tensors" if "layout" in str(e) else "values", str(e)) from None
    if state.batch_size != 1:
        raise SessionFileError("tensors", f"the file holds {state.batch_size} sessions, not one")
    if state.tokens[0] != info["tokens"]:
        raise SessionFileError("counters", "tokens disagrees with the state")
    if len(state.held().text) != info.get("held_bytes", 0):
        raise SessionFileError("counters", "held_bytes disagrees with the state")
    if not atlas.tokenizer.holds_text and info["bytes_committed"] > info["tokens"]:
        # bytes: every document byte is one token (a committed answer adds tokens, no bytes)
        raise SessionFileError("counters", "bytes_committed is more than the tokens a byte-level "
                               "model read")
    return SessionFile(state, state_bytes, info["tokens"], info["bytes_committed"], info["name"],
                       info["metadata"])


__all__ = ["FORMAT", "ForeignSessionFileError", "SessionFile", "SessionFileError", "check_metadata",
           "check_name", "read", "write"]
