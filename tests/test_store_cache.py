"""Hot cache: byte budget, LRU order, staleness against the store's generation, counters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from atlas.engine.store import HotCache

from .store_helpers import make_store, redis_server


@dataclass
class Blob:
    """Stands for a device state: anything with ``nbytes``."""

    tag: str
    nbytes: int


def cached(c: HotCache[Blob], *sids: str) -> list[str]:
    """Which of `sids` are cached at generation 1 (each lookup makes that entry the most recent)."""
    return [sid for sid in sids if c.get(sid, generation=1) is not None]


def test_budget_and_lru_order():
    c: HotCache[Blob] = HotCache(100)
    for i in range(4):
        c.put(f"s{i}", Blob(f"v{i}", 30), generation=1)
    assert cached(c, "s0", "s1", "s2", "s3") == ["s1", "s2", "s3"]  # s0 evicted: LRU
    assert c.stats.bytes == 90
    assert cached(c, "s1") == ["s1"]  # s1 is now the most recently used: s2 goes next
    c.put("s4", Blob("v4", 30), generation=1)
    assert cached(c, "s2") == []
    c.put("big", Blob("b", 70), generation=1)  # evicts as many as needed: s3, then s1
    assert c.stats.bytes == 100 == c.budget and cached(c, "s3", "s1") == []
    assert cached(c, "s4", "big") == ["s4", "big"]
    c.put("s4", Blob("v4b", 10), generation=1)  # replacing re-counts bytes
    assert c.stats.bytes == 80 and c.get("s4", generation=1).value.tag == "v4b"
    st = c.stats
    assert (st.evictions, st.entries, st.bytes, st.budget) == (4, 2, 80, 100)


def test_a_state_larger_than_the_budget_is_not_kept():
    c: HotCache[Blob] = HotCache(50)
    c.put("a", Blob("A", 30), generation=1)
    c.put("huge", Blob("H", 51), generation=1)
    assert cached(c, "a", "huge") == ["a"] and c.stats.evictions == 1
    c.put("a", Blob("A2", 60), generation=2)  # its older copy goes too
    assert c.get("a", generation=1) is None and c.stats.bytes == 0


def test_stale_generation_is_never_served():
    c: HotCache[Blob] = HotCache(100)
    c.put("s", Blob("old", 10), generation=4)
    assert c.get("s", generation=4).value.tag == "old"
    assert c.get("s", generation=5) is None  # the store moved on: dropped, not served
    assert c.get("s", generation=4) is None and c.stats.entries == 0
    c.put("s", Blob("new", 10), generation=5)
    assert c.get("s", generation=5).value.tag == "new"
    st = c.stats
    assert (st.hits, st.misses, st.stale) == (2, 2, 1)


def test_discard_and_errors():
    c: HotCache[Blob] = HotCache(100)
    c.put("a", Blob("A", 10), generation=1)
    c.discard("a")
    c.discard("never cached")
    assert c.get("a", generation=1) is None and c.stats.bytes == 0
    with pytest.raises(ValueError):
        HotCache(-1)


def test_generations_follow_a_real_store(tmp_path):
    """Cached under the generation the store gave each commit, a state is served until the store
    holds a newer one."""
    with redis_server(tmp_path / "redis") as server:
        store = make_store(server.url, f"t{uuid.uuid4().hex[:8]}")
        try:
            cache: HotCache[Blob] = HotCache(2_000)
            sid = store.create("acme").id
            meta = store.put(sid, b"first", fingerprint="f")
            cache.put(sid, Blob("first", 1_000), meta.generation)
            assert cache.get(sid, store.generation(sid)).value.tag == "first"  # fresh
            store.put(sid, b"changed elsewhere", fingerprint="f")
            assert cache.get(sid, store.generation(sid)) is None  # stale now
        finally:
            store.close()
