"""One ingest request: document bytes streamed into a session while the worker reads them.

Two coroutines run per request. The reader takes the body as it arrives, skips what the session
already has, tokenizes and hands tokens to the job (waiting while the job holds more than
`ingest_buffer_bytes` unread: flow control back to the client's socket). The task's own loop follows
the worker: it reports progress, saves the state every `checkpoint_tokens`, and commits at the end.
Whatever ends the request (the body ends, the client goes away, the body fails), the session keeps
exactly what was read.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import AsyncIterator

from ..api import Atlas
from ..state import SessionState
from ..tokenizer import ByteTokenizer
from .errors import OffsetGapError
from .jobs import Control, IngestProgress, Job
from .settings import RuntimeSettings
from .states import SessionStates
from .worker import Worker


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
        self.byte_level = isinstance(atlas.tokenizer, ByteTokenizer)
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._drained = asyncio.Event()
        self._received = 0  # body bytes taken (after the skipped ones)
        self._base = 0  # bytes the session had when the request started
        self._start_tokens = 0
        self._t0 = time.perf_counter()

    async def run(self) -> None:
        state, meta = await self.states.load(self.sid)
        self._base = meta.bytes_committed
        if self.offset is not None and self.offset > self._base:
            raise OffsetGapError(f"offset {self.offset} is past the {self._base} bytes the session has; "
                                 f"resume from {self._base}")
        job = Job(state)
        self._start_tokens = job.tokens
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
            ids = list(piece) if self.byte_level else self.atlas.encode(self._text.decode(piece))
            self.worker.push(job, ids)
            while len(job.input) > self.settings.ingest_buffer_bytes and not job.cancelled:
                self._drained.clear()
                await self._drained.wait()
        if not self.byte_level:
            self.worker.push(job, self.atlas.encode(self._text.decode(b"", final=True)))

    # -- following the worker -----------------------------------------------------------------------

    def _snapshot(self, job: Job) -> tuple[SessionState, int]:
        """The job's state and the document bytes it holds. Byte-level: one token per byte; with
        another tokenizer only a whole request maps to bytes."""
        st = job.state
        if self.byte_level:
            return st, self._base + st.tokens[0] - self._start_tokens
        whole = job.finished and not job.cancelled
        return st, self._base + self._received if whole else self._base

    def _rate(self, state: SessionState) -> float:
        return (state.tokens[0] - self._start_tokens) / max(1e-9, time.perf_counter() - self._t0)

    async def _follow(self, job: Job, reader: asyncio.Task) -> None:
        saved_at = self._start_tokens
        while not job.finished:
            await job.changed()
            self._drained.set()
            if reader.done() and not reader.cancelled() and (failure := reader.exception()) is not None:
                await job.until_finished()  # the job reads what arrived, then stops
                st, nbytes = self._snapshot(job)
                await self.states.save(self.sid, st, self.fence, nbytes)
                raise failure
            if job.error is not None:
                raise job.error
            st, nbytes = self._snapshot(job)
            if st.tokens[0] - saved_at >= self.settings.checkpoint_tokens and not job.finished:
                await self.states.save(self.sid, st, self.fence, nbytes)
                saved_at = st.tokens[0]
            if not job.finished:
                self.events.put_nowait(IngestProgress(self.sid, nbytes, st.tokens[0], self._rate(st)))
        if job.error is not None:
            raise job.error
        st, nbytes = self._snapshot(job)
        meta = await self.states.save(self.sid, st, self.fence, nbytes)
        self.events.put_nowait(IngestProgress(self.sid, meta.bytes_committed, meta.tokens, self._rate(st),
                                              done=True))


__all__ = ["IngestTask"]
