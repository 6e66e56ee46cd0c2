"""Tokenizers. The default is byte-level (vocabulary 256, nothing to download): any UTF-8 text,
cut anywhere, round-trips. A checkpoint that ships a `tokenizer.json` gets that tokenizer instead,
through the `tokenizers` library."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...


class StreamDecoder(Protocol):
    def push(self, token: int) -> str:
        """Text completed by this token (may be empty while a character is still partial)."""
        ...


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _ByteStreamDecoder:
        return _ByteStreamDecoder()


class _ByteStreamDecoder:
    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(bytes([token]))


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def stream_decoder(self) -> _HFStreamDecoder:
        return _HFStreamDecoder(self)


class _HFStreamDecoder:
    """Decodes the growing sequence and emits the new suffix, holding back a trailing partial character."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._sent = tok, 0
        self._ids: list[int] = []

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        out, self._sent = text[self._sent:], len(text)
        return out


def load_tokenizer(checkpoint_dir: Path | None) -> Tokenizer:
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").exists():
        return HFTokenizer(Path(checkpoint_dir) / "tokenizer.json")
    return ByteTokenizer()
