"""Hot cache: recently used live states kept in (device) memory under a byte budget.

Generic over the cached value: anything with an ``nbytes`` int (the engine's ``SessionState``).
Each entry remembers the store generation it was loaded at or last saved as; a caller passes the
store's current generation (``store.generation(sid)``, one small read) to ``get`` and a stale entry
is dropped instead of served. Dirty entries (changed since that generation) are written back
through a callback before they are evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    """A cacheable value: its size in bytes is ``nbytes``."""

    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


@dataclass
class CacheEntry(Generic[V]):
    """One cached state. ``generation``: the store generation it matches (if clean) or derives
    from (if dirty)."""

    value: V
    generation: int
    dirty: bool
    nbytes: int


@dataclass
class CacheStats:
    """Counters of a :class:`HotCache` (snapshot)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0  # entries dropped because the store had moved to a newer generation
    evictions: int = 0
    writebacks: int = 0
    writeback_errors: int = 0
    bytes: int = 0
    entries: int = 0
    budget: int = 0


#: ``write_back(sid, value, generation)`` saves a dirty value and returns its new store
#: generation (or None if unknown).
WriteBack = Callable[[str, V, int], "int | None"]


class HotCache(Generic[V]):
    """LRU cache of states by session id within ``budget_bytes``.

    Thread-safe. The write-back callback runs under the cache's lock, so an evicted dirty state is
    saved before anyone can load an older copy from the store; if it raises, the entry stays cached
    (over budget, still dirty) and the error propagates, so no state is ever lost silently."""

    def __init__(self, budget_bytes: int, write_back: WriteBack[V] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = budget_bytes
        self._write_back = write_back
        self._entries: OrderedDict[str, CacheEntry[V]] = OrderedDict()  # LRU first, MRU last
        self._bytes = 0
        self._lock = threading.RLock()
        self._stats = CacheStats(budget=budget_bytes)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, sid: str, generation: int | None = None) -> CacheEntry[V] | None:
        """The entry of ``sid`` (now most recently used), or None.

        With ``generation`` (the store's current one), an entry of another generation is stale:
        it is dropped (without write-back: its base was superseded) and None is returned."""
        with self._lock:
            e = self._entries.get(sid)
            if e is not None and generation is not None and e.generation != generation:
                self._remove(sid)
                self._stats.stale += 1
                e = None
            if e is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(sid)
            self._stats.hits += 1
            return e

    def peek(self, sid: str) -> CacheEntry[V] | None:
        """The entry without touching LRU order or counters."""
        with self._lock:
            return self._entries.get(sid)

    def __contains__(self, sid: object) -> bool:
        with self._lock:
            return sid in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Session ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._bytes

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            s = self._stats
            return CacheStats(s.hits, s.misses, s.stale, s.evictions, s.writebacks, s.writeback_errors,
                              self._bytes, len(self._entries), self.budget)

    # -- writes ---------------------------------------------------------------------------------
    def put(self, sid: str, value: V, generation: int, *, dirty: bool = False) -> None:
        """Cache ``value`` as the newest copy of ``sid`` (replacing any older entry), then evict
        least recently used entries until the budget holds. A value larger than the whole budget
        is not kept: written back at once if dirty."""
        nbytes = int(value.nbytes)
        with self._lock:
            if sid in self._entries:
                self._remove(sid)
            entry = CacheEntry(value, generation, dirty, nbytes)
            if nbytes > self.budget:
                self._stats.evictions += 1
                if dirty:
                    self._save(sid, entry)
                return
            self._entries[sid] = entry
            self._bytes += nbytes
            while self._bytes > self.budget:
                victim = next(iter(self._entries))
                self._evict(victim)

    def mark_clean(self, sid: str, generation: int) -> None:
        """The caller committed the cached value as ``generation``."""
        with self._lock:
            e = self._entries.get(sid)
            if e is not None:
                e.dirty = False
                e.generation = generation

    def mark_dirty(self, sid: str) -> None:
        """The cached value was changed in place and differs from the store now."""
        with self._lock:
            e = self._entries.get(sid)
            if e is not None:
                e.dirty = True

    def discard(self, sid: str) -> CacheEntry[V] | None:
        """Drop an entry without write-back (session deleted, or superseded); returns it."""
        with self._lock:
            return self._remove(sid)

    def flush(self) -> int:
        """Write back every dirty entry (they stay cached, clean); returns how many."""
        with self._lock:
            dirty = [(sid, e) for sid, e in self._entries.items() if e.dirty]
            for sid, e in dirty:
                self._save(sid, e)
            return len(dirty)

    def clear(self, *, write_back: bool = True) -> None:
        """Empty the cache, writing dirty entries back first unless told not to."""
        with self._lock:
            if write_back:
                self.flush()
            self._entries.clear()
            self._bytes = 0

    # -- internals ------------------------------------------------------------------------------
    def _remove(self, sid: str) -> CacheEntry[V] | None:
        e = self._entries.pop(sid, None)
        if e is not None:
            self._bytes -= e.nbytes
        return e

    def _evict(self, sid: str) -> None:
        e = self._entries[sid]
        if e.dirty:
            self._save(sid, e)  # raises (entry kept) if the write-back fails
        self._remove(sid)
        self._stats.evictions += 1

    def _save(self, sid: str, e: CacheEntry[V]) -> None:
        if self._write_back is None:
            raise RuntimeError(f"dirty state of {sid} evicted but the cache has no write-back")
        try:
            gen = self._write_back(sid, e.value, e.generation)
        except BaseException:
            self._stats.writeback_errors += 1
            raise
        self._stats.writebacks += 1
        e.dirty = False
        if gen is not None:
            e.generation = gen
