"""An ingest source that can be read again from any offset the server has not confirmed yet."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Union

from .errors import AtlasError

#: What ``ingest`` accepts: a path, bytes, a binary file (seekable or not), or an iterator of bytes/str.
IngestSource = Union[  # noqa: UP007 - a runtime alias: `X | Y` of generics needs 3.10+ at import
    str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Iterable[bytes], Iterable[str]]


class Source:
    """An ingest source that can be read again from any offset not yet confirmed by the server.

    Files and bytes are re-read from disk or memory, so a resume after a dropped connection costs
    nothing. A plain iterator cannot rewind: what it yielded is kept in a replay buffer until a
    request's end confirms it (``confirm``: at most one request's bytes, ``request_bytes``, are
    kept); a resume before the buffer raises.
    """

    def __init__(self, src: IngestSource, piece_bytes: int = 1 << 20):
        self.piece_bytes = piece_bytes
        self._path: Path | None = None
        self._data: memoryview | None = None
        self._file: BinaryIO | None = None
        self._base = 0
        self._it: Iterator[bytes] | None = None
        self._buf: list[bytes] = []
        self._buf_start = 0  # source offset of self._buf[0]
        self._pulled = 0     # bytes taken from the iterator so far
        self._exhausted = False
        if isinstance(src, (str, os.PathLike)):
            self._path = Path(src)
            self._path.stat()  # a missing file fails here, before any request
        elif isinstance(src, (bytes, bytearray, memoryview)):
            self._data = memoryview(src).cast("B")
        elif hasattr(src, "read") and _seekable(src):
            self._file = src  # type: ignore[assignment]
            self._base = src.tell()  # type: ignore[union-attr]
        elif hasattr(src, "read"):
            reader = src
            self._it = iter(lambda: reader.read(piece_bytes), b"")
        else:
            pieces: Iterable[bytes | str] = src
            self._it = (p.encode() if isinstance(p, str) else bytes(p) for p in pieces)

    def size(self) -> int | None:
        """The source's length in bytes when it is known without reading it (a path, bytes, a
        seekable file from where it stood); None for a stream."""
        if self._path is not None:
            return self._path.stat().st_size
        if self._data is not None:
            return len(self._data)
        if self._file is not None:
            return self._file.seek(0, os.SEEK_END) - self._base  # pieces() seeks back before reading
        return None

    def pieces(self, start: int) -> Iterator[bytes]:
        """The source's bytes from offset ``start``, in pieces of at most ``piece_bytes``."""
        if self._path is not None:
            with open(self._path, "rb") as f:
                f.seek(start)
                while piece := f.read(self.piece_bytes):
                    yield piece
        elif self._data is not None:
            for i in range(start, len(self._data), self.piece_bytes):
                yield bytes(self._data[i:i + self.piece_bytes])
        elif self._file is not None:
            self._file.seek(self._base + start)
            while piece := self._file.read(self.piece_bytes):
                yield piece
        else:
            yield from self._replay(start)

    def _replay(self, start: int) -> Iterator[bytes]:
        if start < self._buf_start:
            raise AtlasError(0, "cannot_resume", f"the server has {start} bytes of this source but the "
                             f"replay buffer starts at {self._buf_start}; pass a file to resume from disk")
        pos = self._buf_start
        for piece in list(self._buf):
            end = pos + len(piece)
            if end > start:
                yield piece[max(0, start - pos):]
            pos = end
        assert self._it is not None
        while not self._exhausted:
            try:
                piece = next(self._it)
            except StopIteration:
                self._exhausted = True
                return
            if not piece:
                continue
            self._buf.append(piece)
            self._pulled += len(piece)
            if self._pulled > start:
                yield piece[max(0, start - (self._pulled - len(piece))):]

    def confirm(self, offset: int) -> None:
        """The server has committed the source up to ``offset``: drop replay pieces wholly before it."""
        while self._buf and self._buf_start + len(self._buf[0]) <= offset:
            self._buf_start += len(self._buf.pop(0))


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) and isinstance(f.tell(), int)
    except (AttributeError, OSError, ValueError):
        return False
