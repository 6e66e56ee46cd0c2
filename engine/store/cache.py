"""Hot cache: recently used live states kept in (device) memory under a byte budget.

Generic over the cached value: anything with an ``nbytes`` int (the engine's ``SessionState``).
A read cache only: every state in it is also committed in the store. Each entry remembers the
store generation it was loaded at or saved as; a caller passes the store's current generation
(``store.generation(sid)``, one small read) to ``get``, and a stale entry (another replica moved
the session on) is dropped instead of served.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    """A cacheable value: its size in bytes is ``nbytes``."""

    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


@dataclass(frozen=True)
class CacheEntry(Generic[V]):
    """One cached state and the store generation it matches."""

    value: V
    generation: int
    nbytes: int


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`HotCache` (snapshot)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0  # entries dropped because the store had moved to a newer generation
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    budget: int = 0


class HotCache(Generic[V]):
    """LRU cache of states by session id within ``budget_bytes``; thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = budget_bytes
        self._entries: OrderedDict[str, CacheEntry[V]] = OrderedDict()  # LRU first, MRU last
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._stale = self._evictions = 0

    def get(self, sid: str, generation: int) -> CacheEntry[V] | None:
        """The entry of ``sid`` (now most recently used) if it holds ``generation``, the store's
        current one; an entry of another generation is stale: dropped, and None is returned."""
        with self._lock:
            e = self._entries.get(sid)
            if e is not None and e.generation != generation:
                self._remove(sid)
                self._stale += 1
                e = None
            if e is None:
                self._misses += 1
                return None
            self._entries.move_to_end(sid)
            self._hits += 1
            return e

    def put(self, sid: str, value: V, generation: int) -> None:
        """Cache ``value`` as the copy of ``sid`` the store holds at ``generation`` (replacing any
        older entry), then evict least recently used entries until the budget holds. A value larger
        than the whole budget is not kept."""
        entry = CacheEntry(value, generation, int(value.nbytes))
        with self._lock:
            self._remove(sid)
            if entry.nbytes > self.budget:
                self._evictions += 1
                return
            self._entries[sid] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.budget:
                self._remove(next(iter(self._entries)))
                self._evictions += 1

    def sids(self) -> list[str]:
        """The session ids held now (a snapshot)."""
        with self._lock:
            return list(self._entries)

    def discard(self, sid: str) -> None:
        """Drop the entry of ``sid`` if there is one (the session was deleted)."""
        with self._lock:
            self._remove(sid)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._stale, self._evictions, self._bytes,
                              len(self._entries), self.budget)

    def _remove(self, sid: str) -> None:
        e = self._entries.pop(sid, None)
        if e is not None:
            self._bytes -= e.nbytes
