"""One ingest request: document bytes streamed into a session while the worker reads them.

Two coroutines run per request. The reader takes the body as it arrives, skips what the session
already has, turns it into tokens with the tokenizer's incremental encoder (the same tokens however
the document is cut into requests and network pieces) and hands them to the job (waiting while the
job holds more than `ingest_buffer_bytes` unread: flow control back to the client's socket). The
task's own loop follows the worker: it reports progress, saves the state every `checkpoint_tokens`,
and commits at the end. Whatever ends the request (the body ends, the client goes away, the body
fails), the session keeps what was read, and `bytes_committed` says exactly how much.

Byte-level, every token is one byte, so every state maps to a byte count. With a tokenizer.json, a
state maps to bytes at a *mark*, the point after one piece of the body was encoded: the tokens pushed
so far, the bytes received so far, and the text the encoder holds back then, which is saved in the
state (docs/formats.md, "Held-back text"). A checkpoint asks the worker to end a piece at the next
mark (`Job.cut_at`) and saves the state it gets there.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..api import Atlas
from ..state import SessionState
from ..store import SessionMeta
from ..tokenizer import HeldText, IncrementalEncoder
from .errors import OffsetGapError, ShuttingDownError
from .jobs import Control, IngestProgress, Job
from .settings import RuntimeSettings
from .states import SessionStates
from .worker import Worker


@dataclass(frozen=True)
class _Mark:
    tokens: int  # the session's tokens once everything pushed so far is fed
    nbytes: int  # the document bytes the session then has (fed, and held back)
    held: HeldText  # the text held back then


class _Marks:
    """The marks of one request, in order (their token counts never decrease)."""

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._marks: list[_Mark] = []

    def add(self, mark: _Mark) -> None:
        self._tokens.append(mark.tokens)
        self._marks.append(mark)

    def upto(self, tokens: int) -> _Mark | None:
        """The last mark at or before `tokens`."""
        i = bisect.bisect_right(self._tokens, tokens) - 1
        return self._marks[i] if i >= 0 else None

    def at(self, tokens: int) -> _Mark | None:
        m = self.upto(tokens)
        return m if m is not None and m.tokens == tokens else None

    def after(self, tokens: int) -> _Mark | None:
        i = bisect.bisect_right(self._tokens, tokens)
        return self._marks[i] if i < len(self._marks) else None

    def forget(self, tokens: int) -> None:
        """Drop the marks before the last one at or before `tokens` (no state before it is asked for)."""
        i = bisect.bisect_right(self._tokens, tokens) - 1
        if i > 0:
            del self._tokens[:i], self._marks[:i]


class IngestTask:
    def __init__(self, sid: str, body: AsyncIterator[bytes], offset: int | None, fence: int, *,
                 atlas: Atlas, states: SessionStates, worker: Worker, settings: RuntimeSettings,
                 events: asyncio.Queue, control: Control) -> None:
        self.sid = sid
        self.body = body
        self.offset = offset
        self.fence = fence
        self.atlas = atlas
        self.states = states
        self.worker = worker
        self.settings = settings
        self.events = events
        self.control = control
        self.byte_level = not atlas.tokenizer.holds_text
        self._encoder: IncrementalEncoder = atlas.tokenizer.incremental_encoder()
        self._marks = _Marks()
        self._drained = asyncio.Event()
        self._received = 0  # body bytes taken (after the skipped ones)
        self._pushed = 0  # tokens handed to the job
        self._base = 0  # bytes the session had when the request started
        self._start_tokens = 0
        self._meta: SessionMeta | None = None  # the session as last committed
        self._t0 = time.perf_counter()

    async def run(self) -> None:
        state, meta = await self.states.load(self.sid)
        self._base, self._meta = meta.bytes_committed, meta
        if self.offset is not None and self.offset > self._base:
            raise OffsetGapError(f"offset {self.offset} is past the {self._base} bytes the session has; "
                                 f"resume from {self._base}")
        self._encoder = self.atlas.tokenizer.incremental_encoder(state.held())
        job = Job(state)
        self._start_tokens = job.tokens
        self._marks.add(_Mark(job.tokens, self._base, self._encoder.held))
        reader = asyncio.create_task(self._read(job))
        reader.add_done_callback(lambda _: job.wake())  # a failed body must wake the loop
        self.control.attach(job)
        self.worker.submit(job)
        self._t0 = time.perf_counter()
        try:
            await self._follow(job, reader)
        finally:
            reader.cancel()
            if not job.finished:
                self.control.cancel()
                await job.until_finished()

    # -- reading the body ---------------------------------------------------------------------------

    async def _read(self, job: Job) -> None:
        try:
            await self._read_body(job)
        finally:  # on a failed body too: what arrived is document data, and is read
            self.worker.push(job, [], close=True)

    async def _read_body(self, job: Job) -> None:
        skip = self._base - self.offset if self.offset is not None else 0
        async for piece in self.body:
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            if not piece:
                continue
            self._received += len(piece)
            ids = self._encoder.push(piece)
            self._pushed += len(ids)
            if not self.byte_level:  # with the push, at once: the job's input always ends on a mark
                self._marks.add(_Mark(self._start_tokens + self._pushed, self._base + self._received,
                                      self._encoder.held))
            self.worker.push(job, ids)
            while len(job.input) > self.settings.ingest_buffer_bytes and not job.cancelled:
                self._drained.clear()
                await self._drained.wait()
        # The request ends, the document need not: the held-back text stays in the session.

    # -- following the worker -----------------------------------------------------------------------

    def _snapshot(self, st: SessionState, tokens: int) -> tuple[SessionState, int] | None:
        """A state (which has read `tokens`) to save and its `bytes_committed`; None when it does
        not map to bytes (between two marks)."""
        if self.byte_level:
            return st, self._base + tokens - self._start_tokens
        mark = self._marks.at(tokens)
        return (st.with_held(mark.held), mark.nbytes) if mark is not None else None

    def _progress_bytes(self, tokens: int) -> int:
        if self.byte_level:
            return self._base + tokens - self._start_tokens
        mark = self._marks.upto(tokens)
        return mark.nbytes if mark is not None else self._base

    def _rate(self, tokens: int) -> float:
        return (tokens - self._start_tokens) / max(1e-9, time.perf_counter() - self._t0)

    async def _save(self, snap: tuple[SessionState, int]) -> SessionMeta:
        before = self._meta.tokens if self._meta is not None else self._start_tokens
        self._meta = await self.states.save(self.sid, snap[0], self.fence, snap[1])
        self.worker.stats.document_tokens += max(0, self._meta.tokens - before)
        return self._meta

    async def _follow(self, job: Job, reader: asyncio.Task) -> None:
        saved_at = self._start_tokens
        every = self.settings.checkpoint_tokens
        while not job.finished:
            await job.changed()
            self._drained.set()
            if reader.done() and not reader.cancelled() and (failure := reader.exception()) is not None:
                await job.until_finished()  # the job reads what arrived, then stops
                await self._commit(job)
                raise failure
            if job.error is not None:
                raise job.error
            if (cut := job.cut_state) is not None:  # the checkpoint asked for: the state at a mark
                with self.worker.cv:
                    job.cut_state = job.cut_at = None
                tokens = cut.tokens[0]
                if (snap := self._snapshot(cut, tokens)) is not None:
                    await self._save(snap)
                    saved_at = tokens
                    self._marks.forget(tokens)
            st = job.state
            tokens = st.tokens[0]
            if tokens - saved_at >= every and not job.finished and job.cut_at is None:
                if (snap := self._snapshot(st, tokens)) is not None:
                    await self._save(snap)
                    saved_at = tokens
                    self._marks.forget(tokens)
                else:
                    with self.worker.cv:  # a piece ends at the next mark the worker has not taken
                        taken = self._start_tokens + self._pushed - len(job.input)
                        if (mark := self._marks.after(taken)) is not None:
                            job.cut_at = mark.tokens
                            self.worker.cv.notify_all()
            if not job.finished:
                self.events.put_nowait(IngestProgress(self.sid, self._progress_bytes(tokens), tokens,
                                                      self._rate(tokens)))
        if job.error is not None:
            raise job.error
        meta = await self._commit(job)
        self.events.put_nowait(IngestProgress(self.sid, meta.bytes_committed, meta.tokens,
                                              self._rate(meta.tokens), done=True))

    async def _commit(self, job: Job) -> SessionMeta:
        """Save what the finished job read; a job cancelled between two marks first reads on to the
        next one (at most one body piece), in a job of its own."""
        st = job.state
        snap = self._snapshot(st, st.tokens[0])
        if snap is None and job.error is None:
            snap = await self._read_to_mark(job)
        if snap is not None:
            return await self._save(snap)
        assert self._meta is not None
        return self._meta  # nothing new maps to bytes: the session keeps its last checkpoint

    async def _read_to_mark(self, job: Job) -> tuple[SessionState, int] | None:
        tokens = job.state.tokens[0]
        mark = self._marks.after(tokens)
        if mark is None:
            return None
        with self.worker.cv:
            rest = [job.input.popleft() for _ in range(min(len(job.input), mark.tokens - tokens))]
        if len(rest) != mark.tokens - tokens:
            return None
        more = Job(job.state)
        self.worker.push(more, rest, close=True)
        try:
            self.worker.submit(more)
        except ShuttingDownError:
            return None
        await more.until_finished()
        if more.error is not None or more.cancelled or more.tokens != mark.tokens:
            return None
        return more.state.with_held(mark.held), mark.nbytes


__all__ = ["IngestTask"]
