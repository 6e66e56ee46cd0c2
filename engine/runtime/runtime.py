"""The runtime: owns the model and the device and serves many sessions at once.

The public face of the engine for the server. It looks sessions up (a tenant sees only its own),
admits requests (`max_requests`), keeps one operation at a time per session (a per-session lock) and
one writer per session across replicas (the store's lease, renewed while the work runs), and runs
each request as its own task: `IngestTask` or `GenerationTask`, whose jobs the `Worker` thread steps
on the device.

States are values (engine/state.py), so the worker and the saver never share anything mutable: a
checkpoint saves the state object of that moment while the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from .. import session_file
from ..api import Atlas, GeneratedToken
from ..sampling import SamplingParams
from ..state import SessionState
from ..store import (
    HotCache,
    LeaseConflictError,
    SessionMeta,
    SessionNotFoundError,
    StateCorruptError,
    StateStore,
    StoreUnavailableError,
)
from ..store.base import KEEP, Keep
from ..store.redis_store import HEARTBEAT_OWNERS
from .errors import QueueFullError, ShuttingDownError
from .generation import GenerationTask
from .ingest import IngestTask
from .jobs import Control, GenerationDone, IngestProgress, PromptLogprobs
from .settings import RuntimeSettings
from .states import SessionStates
from .stats import RuntimeStats
from .worker import Worker

_END = object()

log = logging.getLogger("atlas.runtime")

Work = Callable[[asyncio.Queue, Control], Awaitable[object]]


#: Seconds between sweeps of the hot cache for sessions gone by their TTL (Runtime.sweep_cache).
CACHE_SWEEP_S = 300.0


class Runtime:
    def __init__(self, atlas: Atlas, store: StateStore, settings: RuntimeSettings | None = None,
                 cache_bytes: int = 1 << 30) -> None:
        self.atlas = atlas
        self.store = store
        self.settings = settings or RuntimeSettings()
        self.stats = RuntimeStats()
        self.states = SessionStates(atlas, store, cache_bytes)
        self.worker = Worker(atlas, self.settings, self.stats)
        # This runtime's name on leases; a `runtime-*` owner keeps a heartbeat in the store, so that
        # a lease it holds when it dies is taken over within a heartbeat, not the lease's TTL.
        self.owner = f"{HEARTBEAT_OWNERS}{uuid.uuid4().hex[:12]}"
        self._locks: dict[str, asyncio.Lock] = {}
        self._writers: dict[str, set[Control]] = {}  # the operations that write each session
        self._tasks: set[asyncio.Task] = set()
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="atlas-heartbeat", daemon=True)
        self._heart.start()

    @property
    def cache(self) -> HotCache[SessionState]:
        """The states' hot cache (read by the metrics)."""
        return self.states.cache

    def close(self) -> None:
        self._stop.set()
        self.worker.close()

    def _beat(self) -> None:
        """Keep this runtime's heartbeat key alive (a thread: it must beat while the loop is busy),
        and now and then drop cached states of sessions that are gone."""
        period_s = self.settings.heartbeat_ms / 1000
        swept = time.monotonic()
        while not self._stop.is_set():
            try:
                self.store.heartbeat(self.owner, 3 * self.settings.heartbeat_ms)
                if time.monotonic() - swept >= CACHE_SWEEP_S:
                    swept = time.monotonic()
                    self.sweep_cache()
            except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.debug("heartbeat of %s not written: %s", self.owner, e)
            self._stop.wait(period_s)

    def sweep_cache(self) -> int:
        """Drop the cached states of sessions the store no longer has: those expired by their TTL
        (a delete drops its own). Returns how many were dropped. Blocking: one store read each."""
        gone = 0
        for sid in self.states.cache.sids():
            try:
                self.store.generation(sid)
            except SessionNotFoundError:
                self.states.forget(sid)
                gone += 1
        return gone

    # -- sessions -----------------------------------------------------------------------------------

    async def create_session(self, tenant: str, ttl_s: int | None = None,
                             max_sessions: int | None = None) -> SessionMeta:
        """A new empty session; TooManySessionsError once the tenant holds `max_sessions`."""
        return await asyncio.to_thread(self.store.create, tenant, fingerprint=self.atlas.fingerprint,
                                       ttl_s=ttl_s, max_sessions=max_sessions)

    async def get_session(self, sid: str, tenant: str) -> SessionMeta:
        """The session's metadata; every request on a session starts here, so this is where a
        sliding TTL (``extra.sliding_ttl``) is extended."""
        meta = await asyncio.to_thread(self.store.meta, sid)
        if meta.tenant != tenant:  # another tenant's session does not exist for this one
            raise SessionNotFoundError(f"no session {sid}", sid=sid)
        if meta.extra.get("sliding_ttl") and meta.ttl_s:
            await asyncio.to_thread(self.store.touch, sid)
        return meta

    async def update_session(self, sid: str, tenant: str, labels: dict[str, Any],
                             ttl_s: int | None | Keep = KEEP) -> SessionMeta:
        """Change a session's labels (`name`, `metadata`, `sliding_ttl` in its extra; a None value
        removes one) and its TTL; the state is untouched, also while a writer works on it."""
        meta = await self.get_session(sid, tenant)
        extra = {k: v for k, v in {**meta.extra, **labels}.items() if v is not None}
        return await asyncio.to_thread(self.store.update, sid, extra=extra, ttl_s=ttl_s, labels_only=True)

    async def export_session(self, sid: str, tenant: str) -> bytes:
        """The session's committed state as a session file (engine/session_file.py)."""
        await self.get_session(sid, tenant)
        async with self._lock(sid):  # as a generation's read: wait for a local writer to finish
            state, meta = await self.states.load(sid)
        data = await asyncio.to_thread(self.atlas.save_state, state)
        return await asyncio.to_thread(
            session_file.write, data, fingerprint=self.atlas.fingerprint, tokens=state.tokens[0],
            bytes_committed=meta.bytes_committed, name=meta.extra.get("name"),
            metadata=meta.extra.get("metadata"))

    async def import_session(self, tenant: str, data: bytes, ttl_s: int | None = None,
                             max_sessions: int | None = None) -> SessionMeta:
        """A new session of `tenant` from a session file, checked (SessionFileError) before it is
        stored; identical to the exported one (the same state bytes, counters and labels)."""
        f = await asyncio.to_thread(session_file.read, data, self.atlas)
        extra = {k: v for k, v in (("name", f.name), ("metadata", f.metadata)) if v}
        return await asyncio.to_thread(
            self.store.create, tenant, fingerprint=self.atlas.fingerprint, ttl_s=ttl_s, extra=extra,
            data=f.state_bytes, tokens=f.tokens, bytes_committed=f.bytes_committed,
            max_sessions=max_sessions)

    async def list_sessions(self, tenant: str) -> list[SessionMeta]:
        return await asyncio.to_thread(self.store.list, tenant)

    async def delete_session(self, sid: str, tenant: str) -> None:
        """Also a session whose metadata is broken, if it is in the tenant's index."""
        try:
            await self.get_session(sid, tenant)
        except StateCorruptError:
            if not await asyncio.to_thread(self.store.owns, tenant, sid):
                raise SessionNotFoundError(f"no session {sid}", sid=sid) from None
        for control in list(self._writers.get(sid, ())):
            control.cancel()  # an ingest (or committing generation) stops within a step, commits
        async with self._lock(sid):
            try:
                await asyncio.to_thread(self.store.delete, sid, tenant=tenant)
            except LeaseConflictError:
                # Leased: by another runtime (this raises again, with how long to wait), or under
                # this one's own name, a leftover whose release was lost with Redis (it holds the
                # lock, so none of its operations runs): taken over, then deleted under it.
                lease = await asyncio.to_thread(self.store.lease, sid, self.owner,
                                                self.settings.lease_ttl_ms, reclaim=True)
                await asyncio.to_thread(self.store.delete, sid, fence=lease.fence, tenant=tenant)
            self.states.forget(sid)
        self._locks.pop(sid, None)

    async def fork(self, sid: str, tenant: str, max_sessions: int | None = None) -> SessionMeta:
        """A new session starting from this one's committed state (counted against `max_sessions`)."""
        await self.get_session(sid, tenant)
        async with self._lock(sid):
            state, meta = await self.states.load(sid)
            data = await asyncio.to_thread(self.atlas.save_state, state)
            return await asyncio.to_thread(
                self.store.create, tenant, fingerprint=self.atlas.fingerprint, ttl_s=meta.ttl_s,
                extra=dict(meta.extra, forked_from=sid), data=data, tokens=meta.tokens,
                bytes_committed=meta.bytes_committed, max_sessions=max_sessions)

    # -- requests -----------------------------------------------------------------------------------

    async def ingest(self, sid: str, tenant: str, body: AsyncIterator[bytes],
                     offset: int | None = None) -> AsyncGenerator[IngestProgress, None]:
        """Stream document bytes into a session. `offset` is where `body` starts in the document:
        bytes the session already has are skipped (a resumed upload is idempotent); an offset past
        them is an OffsetGapError. Progress comes back as the device reads; the state is saved every
        `checkpoint_tokens` and at the end. If the caller goes away, the work stops within a step
        and the session keeps (commits) everything read until then."""
        await self.get_session(sid, tenant)

        async def work(events: asyncio.Queue, control: Control) -> None:
            async with self._writing(sid, control), self._lock(sid), self._write_lease(sid) as fence:
                await IngestTask(sid, body, offset, fence, atlas=self.atlas, states=self.states,
                                 worker=self.worker, settings=self.settings, events=events,
                                 control=control).run()

        async for ev in self._stream(work):
            yield ev

    async def generate(self, sid: str | None, tenant: str, prompt: str | list[int],
                       params: SamplingParams, commit: bool = False, timeout_s: float | None = None
                       ) -> AsyncGenerator[GeneratedToken | PromptLogprobs | GenerationDone, None]:
        """Continue a session (or, with sid None, an empty state) after `prompt`. By default the
        exchange runs on a copy and the session stays as it was; `commit` appends it instead.
        `timeout_s` from now on, no more tokens are sampled and the generation ends "timeout" (as
        "length" ends it: the text held back for a stop string sent, the exchange committed). The
        document ends where the prompt starts: text the session holds back (a tokenizer.json's
        incremental encoder, docs/formats.md) is fed first, on the copy; with `commit` the session
        then holds nothing back."""
        ids = self.atlas.encode(prompt) if isinstance(prompt, str) else list(prompt)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if sid is not None:
            await self.get_session(sid, tenant)

        def task(state: SessionState, events: asyncio.Queue, control: Control) -> GenerationTask:
            state, document = self.atlas.end_document(state)
            return GenerationTask(state, ids, params, atlas=self.atlas, worker=self.worker, events=events,
                                  control=control, document=document, deadline=deadline)

        async def work(events: asyncio.Queue, control: Control) -> None:
            if sid is None:
                events.put_nowait(await task(self.atlas.new_state(), events, control).run())
            elif not commit:
                async with self._lock(sid):  # readers hold the session only to take its state
                    state, _ = await self.states.load(sid)
                events.put_nowait(await task(state, events, control).run())
            else:
                async with self._writing(sid, control), self._lock(sid), self._write_lease(sid) as fence:
                    state, _ = await self.states.load(sid)
                    done = await task(state, events, control).run()
                    assert done.state is not None
                    done.session = await self.states.save(sid, done.state, fence, None)
                    events.put_nowait(done)

        async for ev in self._stream(work):
            yield ev

    # -- plumbing -----------------------------------------------------------------------------------

    def _lock(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _writing(self, sid: str, control: Control) -> AsyncIterator[None]:
        """`control` writes `sid` meanwhile (running or waiting for it): a delete cancels it."""
        self._writers.setdefault(sid, set()).add(control)
        try:
            yield
        finally:
            writers = self._writers.get(sid, set())
            writers.discard(control)
            if not writers:
                self._writers.pop(sid, None)

    def _admit(self) -> None:
        with self.worker.cv:
            if self.worker.stopping:
                raise ShuttingDownError("the runtime is shutting down")
            if self.stats.admitted >= self.settings.max_requests:
                raise QueueFullError(f"{self.stats.admitted} requests in progress; retry later")
            self.stats.admitted += 1

    def _release(self) -> None:
        with self.worker.cv:
            self.stats.admitted -= 1

    @contextlib.asynccontextmanager
    async def _write_lease(self, sid: str) -> AsyncIterator[int]:
        """The session's write lease for the length of an operation, renewed in the background;
        yields the fencing token that every commit of the operation carries."""
        ttl = self.settings.lease_ttl_ms
        # reclaim: this runtime runs one operation per session (the lock), so a lease under its own
        # name is a leftover whose release was lost (Redis went away mid-request).
        lease = await asyncio.to_thread(self.store.lease, sid, self.owner, ttl, reclaim=True)

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3000)
                await asyncio.to_thread(lease.renew)

        renewer = asyncio.create_task(renew())
        store_away = False
        try:
            yield lease.fence
        except StoreUnavailableError:
            # Not released: that would hold the caller another socket timeout. The lease is this
            # runtime's leftover, which its next request on the session reclaims (or it expires).
            store_away = True
            raise
        finally:
            renewer.cancel()
            if not store_away:
                await asyncio.to_thread(lease.release)

    async def _stream(self, work: Work) -> AsyncGenerator[Any, None]:
        """Run `work` as its own task and relay its events. The task is never cancelled from here:
        if the caller goes away, the job is flagged, stops within a step, and the task still
        commits what it did and lets go of the session."""
        self._admit()
        events: asyncio.Queue = asyncio.Queue()
        control = Control(self.worker.cv)

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


__all__ = ["Runtime"]
