"""Session states in and out of the store, through the hot cache.

A session's committed state is loaded once and kept in the cache under the store's generation
counter, so the next request on the session does not read or parse it again; every save puts the
new state in the cache under the generation the store gave it.
"""

from __future__ import annotations

import asyncio

from ..api import Atlas
from ..state import SessionState
from ..store import HotCache, NoStateError, SessionMeta, StateStore


class SessionStates:
    def __init__(self, atlas: Atlas, store: StateStore, cache_bytes: int) -> None:
        self.atlas = atlas
        self.store = store
        self.cache: HotCache[SessionState] = HotCache(cache_bytes)

    async def load(self, sid: str) -> tuple[SessionState, SessionMeta]:
        """The session's committed state (a new one if nothing was committed yet)."""
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

    async def save(self, sid: str, state: SessionState, fence: int,
                   bytes_committed: int | None) -> SessionMeta:
        """Commit `state` under the writer's fencing token; `bytes_committed` None keeps the count."""
        data = await asyncio.to_thread(self.atlas.save_state, state)
        meta = await asyncio.to_thread(self.store.put, sid, data, fingerprint=self.atlas.fingerprint,
                                       tokens=state.tokens[0], bytes_committed=bytes_committed, fence=fence)
        self.cache.put(sid, state, meta.generation)
        return meta

    def forget(self, sid: str) -> None:
        self.cache.discard(sid)


__all__ = ["SessionStates"]
