"""The runtime: owns the model and the device and serves many sessions at once.

One worker thread runs steps. A step takes one chunk-aligned piece of every active ingest and
prompt (pieces of equal length are fed as one batch) and one decode token of every generating
session (all fed as one batch). The asyncio side (the server) submits work, streams progress and
tokens back, and talks to the store: sessions are loaded through the hot cache, written under the
store's lease, and one operation at a time runs on a session (per-session lock).

States are values (engine.state), so the worker and the saver never share anything mutable: a
checkpoint saves the state object of that moment while the worker goes on.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from ..api import Atlas, GeneratedToken
from ..sampling import SamplingParams, StopMatcher, sample
from ..state import SessionState
from ..store import HotCache, NoStateError, SessionMeta, SessionNotFoundError, StateStore
from ..tokenizer import ByteTokenizer
from .errors import OffsetGapError, QueueFullError, ShuttingDownError
from .settings import RuntimeSettings


@dataclass
class IngestProgress:
    session_id: str
    bytes_committed: int  # document bytes in the session (committed to the store when done)
    tokens: int  # tokens in the session
    tokens_per_s: float  # rate of this request
    done: bool = False


@dataclass
class GenerationDone:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    session: SessionMeta | None = None  # the session after a committed exchange
    state: SessionState | None = field(default=None, repr=False)


@dataclass
class RuntimeStats:
    steps: int = 0
    decode_tokens: int = 0
    ingest_tokens: int = 0
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=4096))
    running: int = 0
    admitted: int = 0


class _Job:
    """Work of one request, shared by the worker (which advances `state`) and its async owner."""

    def __init__(self, state: SessionState, wake: Callable[[], None]):
        self.state = state
        self.wake = wake
        self.tokens = state.tokens[0]  # cached: reading it from the tensor would sync the device
        self.input: deque[int] = deque()  # tokens waiting to be fed
        self.closed = False  # no more input will come
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None


class _Control:
    """The caller's handle on a running request: lets it cancel the job from the event loop."""

    def __init__(self, cv: threading.Condition):
        self._cv = cv
        self.job: _Job | None = None
        self.cancelled = False

    def attach(self, job: _Job) -> None:
        """The request's job; cancelled at once if the caller already left."""
        with self._cv:
            self.job = job
            job.cancelled = self.cancelled

    def cancel(self) -> None:
        with self._cv:
            self.cancelled = True
            if self.job is not None and not self.job.finished:
                self.job.cancelled = True
            self._cv.notify_all()


_END = object()


class _GenJob(_Job):
    def __init__(self, state: SessionState, wake: Callable[[], None], prompt: list[int],
                 params: SamplingParams, atlas: Atlas):
        super().__init__(state, wake)
        self.input.extend(prompt)
        self.closed = True
        self.params = params
        self.generator = params.generator(state.device)
        self.decoder = atlas.tokenizer.stream_decoder()
        self.stops = StopMatcher(params.stop)
        self.out: deque[GeneratedToken] = deque()
        self.last: int | None = None  # sampled, emitted, not yet fed
        self.generated = 0
        self.finish_reason: str | None = None


class Runtime:
    def __init__(self, atlas: Atlas, store: StateStore, settings: RuntimeSettings | None = None,
                 cache_bytes: int = 1 << 30):
        self.atlas = atlas
        self.store = store
        self.settings = settings or RuntimeSettings()
        self.cache: HotCache[SessionState] = HotCache(cache_bytes)
        self.stats = RuntimeStats()
        self.owner = f"runtime-{uuid.uuid4().hex[:12]}"
        self._cv = threading.Condition()
        self._jobs: list[_Job] = []
        self._stop = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._batch = _DecodeBatch()
        self._thread = threading.Thread(target=self._run, name="atlas-runtime", daemon=True)
        self._thread.start()

    # -- admission and sessions ---------------------------------------------------------------------

    def _admit(self) -> None:
        with self._cv:
            if self._stop:
                raise ShuttingDownError("the runtime is shutting down")
            if self.stats.admitted >= self.settings.max_requests:
                raise QueueFullError(f"{self.stats.admitted} requests in progress; retry later")
            self.stats.admitted += 1

    def _release(self) -> None:
        with self._cv:
            self.stats.admitted -= 1

    def _lock(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    async def create_session(self, tenant: str, ttl_s: int | None = None) -> SessionMeta:
        return await asyncio.to_thread(self.store.create, tenant, fingerprint=self.atlas.fingerprint,
                                       ttl_s=ttl_s)

    async def get_session(self, sid: str, tenant: str) -> SessionMeta:
        meta = await asyncio.to_thread(self.store.meta, sid)
        if meta.tenant != tenant:  # another tenant's session does not exist for this one
            raise SessionNotFoundError(f"no session {sid}", sid=sid)
        return meta

    async def list_sessions(self, tenant: str) -> list[SessionMeta]:
        return await asyncio.to_thread(self.store.list, tenant)

    async def delete_session(self, sid: str, tenant: str) -> None:
        await self.get_session(sid, tenant)
        async with self._lock(sid):
            await asyncio.to_thread(self.store.delete, sid)
            self.cache.discard(sid)
        self._locks.pop(sid, None)

    async def fork(self, sid: str, tenant: str) -> SessionMeta:
        """A new session starting from this one's committed state."""
        meta = await self.get_session(sid, tenant)
        async with self._lock(sid):
            state, meta = await self._load(sid)
            data = await asyncio.to_thread(self.atlas.save_state, state)
            child = await asyncio.to_thread(
                self.store.create, tenant, fingerprint=self.atlas.fingerprint, ttl_s=meta.ttl_s,
                extra=dict(meta.extra, forked_from=sid), data=data)
            return await asyncio.to_thread(self.store.update, child.id, tokens=meta.tokens,
                                           bytes_committed=meta.bytes_committed)

    async def _load(self, sid: str) -> tuple[SessionState, SessionMeta]:
        meta = await asyncio.to_thread(self.store.meta, sid)
        entry = self.cache.get(sid, meta.generation)
        if entry is not None:
            return entry.value, meta
        try:
            data, meta = await asyncio.to_thread(self.store.get, sid,
                                                 expected_fingerprint=self.atlas.fingerprint)
            state = await asyncio.to_thread(self.atlas.load_state, data)
        except NoStateError:
            state = self.atlas.new_state()
        self.cache.put(sid, state, meta.generation)
        return state, meta

    async def _save(self, sid: str, state: SessionState, fence: int,
                    bytes_committed: int | None) -> SessionMeta:
        data = await asyncio.to_thread(self.atlas.save_state, state)
        meta = await asyncio.to_thread(self.store.put, sid, data, fingerprint=self.atlas.fingerprint,
                                       tokens=state.tokens[0], bytes_committed=bytes_committed, fence=fence)
        self.cache.put(sid, state, meta.generation)
        return meta

    # -- requests ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _write_lease(self, sid: str) -> AsyncIterator[int]:
        """The session's write lease for the length of an operation, renewed in the background;
        yields the fencing token that every commit of the operation carries."""
        ttl = self.settings.lease_ttl_ms
        lease = await asyncio.to_thread(self.store.lease, sid, self.owner, ttl)

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3000)
                await asyncio.to_thread(lease.renew)

        renewer = asyncio.create_task(renew())
        try:
            yield lease.fence
        finally:
            renewer.cancel()
            await asyncio.to_thread(lease.release)

    async def _stream(self, work: Callable[[asyncio.Queue, _Control], object]) -> AsyncIterator:
        """Run `work` as its own task and relay its events. The task is never cancelled from here:
        if the caller goes away, the job is flagged, stops within a step, and the task still
        commits what it did and lets go of the session."""
        self._admit()
        events: asyncio.Queue = asyncio.Queue()
        control = _Control(self._cv)

        async def run() -> None:
            try:
                await work(events, control)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                events.put_nowait(e)
            finally:
                events.put_nowait(_END)
                self._release()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            while (ev := await events.get()) is not _END:
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
        finally:
            control.cancel()

    async def ingest(self, sid: str, tenant: str, body: AsyncIterator[bytes],
                     offset: int | None = None) -> AsyncIterator[IngestProgress]:
        """Stream document bytes into a session. `offset` is where `body` starts in the document:
        bytes the session already has are skipped (a resumed upload is idempotent); an offset past
        them is an OffsetGapError. Progress comes back as the device reads; the state is saved every
        `checkpoint_tokens` and at the end. If the caller goes away, the work stops within a step
        and the session keeps (commits) everything read until then."""
        await self.get_session(sid, tenant)

        async def work(events: asyncio.Queue, control: _Control) -> None:
            async with self._lock(sid), self._write_lease(sid) as fence:
                await self._ingest(sid, body, offset, fence, events, control)

        async for ev in self._stream(work):
            yield ev

    async def _ingest(self, sid: str, body: AsyncIterator[bytes], offset: int | None, fence: int,
                      events: asyncio.Queue, control: _Control) -> None:
        state, meta = await self._load(sid)
        base = meta.bytes_committed
        if offset is not None and offset > base:
            raise OffsetGapError(f"offset {offset} is past the {base} bytes the session has; "
                                 f"resume from {base}")
        skip = base - offset if offset is not None else 0
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        job = _Job(state, lambda: loop.call_soon_threadsafe(wake.set))
        start_tokens = job.tokens
        byte_level = isinstance(self.atlas.tokenizer, ByteTokenizer)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        drained = asyncio.Event()
        received = 0

        async def read() -> None:
            try:
                await read_body()
            finally:  # on a failed body too: what arrived is document data, and is read
                with self._cv:
                    job.closed = True
                    self._cv.notify_all()

        async def read_body() -> None:
            nonlocal skip, received
            async for piece in body:
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                if not piece:
                    continue
                received += len(piece)
                ids = list(piece) if byte_level else self.atlas.encode(text.decode(piece))
                with self._cv:
                    job.input.extend(ids)
                    self._cv.notify_all()
                while len(job.input) > self.settings.ingest_buffer_bytes and not job.cancelled:
                    drained.clear()
                    await drained.wait()
            tail = [] if byte_level else self.atlas.encode(text.decode(b"", final=True))
            with self._cv:
                job.input.extend(tail)

        def snapshot() -> tuple[SessionState, int]:
            # Byte-level: one token per byte. Otherwise only a whole request maps to bytes.
            st = job.state
            fed = st.tokens[0] - start_tokens
            if byte_level:
                return st, base + fed
            return st, base + received if job.finished and not job.cancelled else base

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: wake.set())  # a failed body must wake the loop below
        control.attach(job)
        self._submit(job)
        t0 = time.perf_counter()
        saved_at = start_tokens
        try:
            while not job.finished:
                await wake.wait()
                wake.clear()
                drained.set()
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    await self._wait(job, wake)  # the job reads what arrived, then stops
                    st, nbytes = snapshot()
                    await self._save(sid, st, fence, nbytes)
                    raise reader.exception()
                if job.error is not None:
                    raise job.error
                st, nbytes = snapshot()
                rate = (st.tokens[0] - start_tokens) / max(1e-9, time.perf_counter() - t0)
                if st.tokens[0] - saved_at >= self.settings.checkpoint_tokens and not job.finished:
                    await self._save(sid, st, fence, nbytes)
                    saved_at = st.tokens[0]
                if not job.finished:
                    events.put_nowait(IngestProgress(sid, nbytes, st.tokens[0], rate))
            if job.error is not None:
                raise job.error
            st, nbytes = snapshot()
            meta = await self._save(sid, st, fence, nbytes)
            rate = (st.tokens[0] - start_tokens) / max(1e-9, time.perf_counter() - t0)
            events.put_nowait(IngestProgress(sid, meta.bytes_committed, meta.tokens, rate, done=True))
        finally:
            reader.cancel()
            if not job.finished:
                control.cancel()
                await self._wait(job, wake)

    async def generate(self, sid: str | None, tenant: str, prompt: str | list[int],
                       params: SamplingParams, commit: bool = False
                       ) -> AsyncIterator[GeneratedToken | GenerationDone]:
        """Continue a session (or, with sid None, an empty state) after `prompt`. By default the
        exchange runs on a copy and the session stays as it was; `commit` appends it instead."""
        ids = self.atlas.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if sid is not None:
            await self.get_session(sid, tenant)

        async def work(events: asyncio.Queue, control: _Control) -> None:
            if sid is None:
                await self._generate(self.atlas.new_state(), ids, params, events, control)
            elif not commit:
                async with self._lock(sid):  # readers hold the session only to take its state
                    state, _ = await self._load(sid)
                await self._generate(state, ids, params, events, control)
            else:
                async with self._lock(sid), self._write_lease(sid) as fence:
                    state, _ = await self._load(sid)
                    done = await self._generate(state, ids, params, events, control, hold=True)
                    done.session = await self._save(sid, done.state, fence, None)
                    events.put_nowait(done)

        async for ev in self._stream(work):
            yield ev

    async def _generate(self, state: SessionState, ids: list[int], params: SamplingParams,
                        events: asyncio.Queue, control: _Control, hold: bool = False) -> GenerationDone:
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        job = _GenJob(state, lambda: loop.call_soon_threadsafe(wake.set), ids, params, self.atlas)
        control.attach(job)
        self._submit(job)
        while True:
            await wake.wait()
            wake.clear()
            with self._cv:
                out = list(job.out)
                job.out.clear()
            for tok in out:
                events.put_nowait(tok)
            if job.error is not None:
                raise job.error
            if job.finished:
                done = GenerationDone(job.finish_reason or "length", len(ids), job.generated, state=job.state)
                if not hold:
                    events.put_nowait(done)
                return done

    # -- worker -------------------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        with self._cv:
            if self._stop:
                raise ShuttingDownError("the runtime is shutting down")
            self._jobs.append(job)
            self.stats.running = len(self._jobs)
            self._cv.notify_all()

    async def _wait(self, job: _Job, wake: asyncio.Event) -> None:
        while not job.finished:
            await wake.wait()
            wake.clear()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            for j in self._jobs:
                j.cancelled = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _ready(self, job: _Job) -> bool:
        if job.cancelled or (job.closed and not job.input and not isinstance(job, _GenJob)):
            return True
        b = self.atlas.config.chunk_size
        if job.input:
            return job.closed or len(job.input) + job.tokens % b >= b
        return isinstance(job, _GenJob)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not any(self._ready(j) for j in self._jobs):
                    self._cv.wait(timeout=0.5)
                if self._stop and not self._jobs:
                    return
                jobs = list(self._jobs)
            try:
                self._step(jobs)
            except BaseException as e:  # a failed step fails its requests, not the runtime
                for j in jobs:
                    j.error = e
                    self._finish(j)

    def _finish(self, job: _Job, reason: str | None = None) -> None:
        with self._cv:
            job.finished = True
            if isinstance(job, _GenJob):
                job.finish_reason = job.finish_reason or reason
            if job in self._jobs:
                self._jobs.remove(job)
            self.stats.running = len(self._jobs)
        job.wake()

    def _step(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        b = self.atlas.config.chunk_size
        piece = self.settings.ingest_chunks_per_step * b
        feeds: dict[int, list[tuple[_Job, list[int]]]] = {}
        decodes: list[_GenJob] = []
        for job in jobs:
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            with self._cv:
                avail = len(job.input)
                if avail:
                    # Pieces end on the chunk grid (except the last), so sessions batch together.
                    room = piece - job.tokens % b
                    n = min(avail, room) if job.closed or avail >= room else avail - (avail + job.tokens) % b
                    ids = [job.input.popleft() for _ in range(n)] if n > 0 else []
                else:
                    ids = []
            if ids:
                feeds.setdefault(len(ids), []).append((job, ids))
            elif not job.input and isinstance(job, _GenJob):
                decodes.append(job)
            elif not job.input and job.closed:
                self._finish(job)
        for group in feeds.values():
            self._feed([j for j, _ in group], [ids for _, ids in group])
            self.stats.ingest_tokens += sum(len(ids) for _, ids in group)
            for j, _ in group:
                j.wake()
        decodes = [j for j in decodes if not j.finished]
        if decodes:
            self._decode(decodes)
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - start)

    def _feed(self, jobs: list[_Job], ids: list[list[int]]) -> None:
        state = jobs[0].state if len(jobs) == 1 else SessionState.stack(j.state for j in jobs)
        state, _ = self.atlas.feed(state, ids)
        for i, j in enumerate(jobs):
            j.state = state if len(jobs) == 1 else state[i]
            j.tokens += len(ids[i])

    def _decode(self, jobs: list[_GenJob]) -> None:
        """One token for every generating session. Members of the decode batch stay stacked from
        step to step (the one-row decode path shares the big state tensors instead of copying
        them); a member whose token completes its chunk is committed through the block path and
        written back into its own slot. Sessions join once, after their prompt, and leave by
        copying their slot out."""
        b = self.atlas.config.chunk_size
        batch = self._batch
        kept = [i for i, j in enumerate(batch.jobs) if not j.finished]
        if len(kept) != len(batch.jobs):
            idx = torch.tensor(kept, dtype=torch.long, device=self.atlas.device)
            batch.state = batch.state.select(idx) if kept else None
            batch.jobs = [batch.jobs[i] for i in kept]
        members = {id(j) for j in batch.jobs}
        newcomers = [j for j in jobs if id(j) not in members and not j.finished]
        for j in newcomers:
            if j.last is None:
                self._sample(j, j.state.last_logits[0])
        joining = [j for j in newcomers if j.last is not None and not j.finished]
        stale = [j for j in joining if not j.state.cache_valid]
        if stale:  # e.g. a stored session decoded without a prompt: recompute its chunk first
            self._feed(stale, [[j.last] for j in stale])
            self.stats.decode_tokens += len(stale)
            self._after_feed(stale, [j.state for j in stale])
        joining = [j for j in joining if j not in stale]
        if joining:
            parts = ([batch.state] if batch.state else []) + [j.state for j in joining]
            batch.state = SessionState.stack(parts)
            batch.jobs += joining
        if not batch.jobs:
            return
        st = batch.state
        tokens = [j.last for j in batch.jobs]
        new, _ = self.atlas.decode_step(st, tokens)
        completing = [i for i, j in enumerate(batch.jobs) if j.tokens % b == b - 1]
        if completing:
            idx = torch.tensor(completing, dtype=torch.long, device=self.atlas.device)
            committed, _ = self.atlas.feed(st.select(idx), [[tokens[i]] for i in completing])
            for k, v in new.tensors.items():
                v.index_copy_(0, idx, committed.tensors[k])
        batch.state = new
        for j in batch.jobs:
            j.tokens += 1
        self.stats.decode_tokens += len(batch.jobs)
        self._after_feed(batch.jobs, [new] * len(batch.jobs), slots=True)

    def _after_feed(self, jobs: list[_GenJob], states: list[SessionState], slots: bool = False) -> None:
        for i, j in enumerate(jobs):
            row = i if slots else 0
            if j.stops.stopped or j.generated >= j.params.max_tokens:
                if slots:  # its own copy: the slot will be reused
                    j.state = states[i].select(torch.tensor([row], device=self.atlas.device))
                self._finish(j, "stop" if j.stops.stopped else "length")
            else:
                self._sample(j, states[i].last_logits[row])

    def _sample(self, j: _GenJob, logits: torch.Tensor) -> None:
        p = j.params
        if j.generated >= p.max_tokens:
            self._finish(j, "length")
            return
        tok = sample(logits, p, j.generator)
        j.generated += 1
        text = j.stops.push(j.decoder.push(tok))
        if j.stops.stopped or j.generated >= p.max_tokens:
            text += j.stops.flush()
        with self._cv:
            j.out.append(GeneratedToken(tok, text))
        j.last = tok
        j.wake()


class _DecodeBatch:
    def __init__(self) -> None:
        self.jobs: list[_GenJob] = []
        self.state: SessionState | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


__all__ = ["GenerationDone", "IngestProgress", "Runtime", "RuntimeStats", "percentile"]
