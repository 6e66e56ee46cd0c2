"""Hot cache: byte budget, LRU order, write-back of dirty entries, staleness, counters."""

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

    def to_bytes(self) -> bytes:
        return self.tag.encode() * self.nbytes


class Sink:
    """A write-back that records what it saved and hands out generations."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, str, int]] = []

    def __call__(self, sid: str, value: Blob, generation: int) -> int:
        self.saved.append((sid, value.tag, generation))
        return generation + 1


def test_budget_and_lru_order():
    c: HotCache[Blob] = HotCache(100)
    for i in range(4):
        c.put(f"s{i}", Blob(f"v{i}", 30), generation=1)
    assert c.keys() == ["s1", "s2", "s3"] and c.nbytes == 90  # s0 evicted: LRU
    assert c.get("s1") is not None  # s1 is now the most recently used
    c.put("s4", Blob("v4", 30), generation=1)
    assert c.keys() == ["s3", "s1", "s4"]
    c.put("big", Blob("b", 70), generation=1)  # evicts as many as needed
    assert c.keys() == ["s4", "big"] and c.nbytes == 100 <= c.budget
    c.put("s4", Blob("v4b", 10), generation=2)  # replacing re-counts bytes
    assert c.nbytes == 80 and c.peek("s4").value.tag == "v4b"
    st = c.stats
    assert (st.evictions, st.entries, st.bytes, st.budget) == (4, 2, 80, 100)


def test_dirty_eviction_writes_back_first():
    sink = Sink()
    c: HotCache[Blob] = HotCache(60, write_back=sink)
    c.put("a", Blob("A", 30), generation=3, dirty=True)
    c.put("b", Blob("B", 30), generation=5)
    c.put("c", Blob("C", 30), generation=1)  # evicts a (dirty): saved before it goes
    assert sink.saved == [("a", "A", 3)] and "a" not in c
    c.put("d", Blob("D", 30), generation=1)  # evicts b (clean): nothing saved
    assert sink.saved == [("a", "A", 3)]
    c.mark_dirty("c")
    assert c.flush() == 1 and sink.saved[-1] == ("c", "C", 1)
    assert c.peek("c").generation == 2 and not c.peek("c").dirty  # the write-back's generation
    c.put("huge", Blob("H", 1000), generation=9, dirty=True)  # larger than the budget: saved, not kept
    assert "huge" not in c and sink.saved[-1] == ("huge", "H", 9)
    st = c.stats
    assert (st.writebacks, st.evictions) == (3, 3)


def test_failed_write_back_keeps_the_state():
    def broken(sid: str, value: Blob, generation: int) -> int:
        raise ConnectionError("store down")

    c: HotCache[Blob] = HotCache(50, write_back=broken)
    c.put("a", Blob("A", 30), generation=1, dirty=True)
    with pytest.raises(ConnectionError):
        c.put("b", Blob("B", 30), generation=1)
    entry = c.peek("a")
    assert entry is not None and entry.dirty  # not lost: still cached, still dirty
    assert c.stats.writeback_errors == 1
    c.discard("a")  # the caller decides (e.g. after saving it another way)
    assert c.nbytes == 30


def test_stale_generation_is_never_served():
    c: HotCache[Blob] = HotCache(100)
    c.put("s", Blob("old", 10), generation=4)
    assert c.get("s", generation=4).value.tag == "old"
    assert c.get("s", generation=5) is None  # the store moved on: dropped, not served
    assert "s" not in c and c.get("s") is None
    c.put("s", Blob("new", 10), generation=5)
    c.mark_clean("s", 6)
    assert c.get("s", generation=6).value.tag == "new"
    st = c.stats
    assert (st.hits, st.misses, st.stale) == (2, 2, 1)


def test_clear_and_errors():
    sink = Sink()
    c: HotCache[Blob] = HotCache(100, write_back=sink)
    c.put("a", Blob("A", 10), generation=1, dirty=True)
    c.put("b", Blob("B", 10), generation=1)
    c.clear()
    assert len(c) == 0 and c.nbytes == 0 and sink.saved == [("a", "A", 1)]
    no_wb: HotCache[Blob] = HotCache(10)
    no_wb.put("a", Blob("A", 10), generation=1, dirty=True)
    with pytest.raises(RuntimeError):
        no_wb.put("b", Blob("B", 10), generation=1)
    with pytest.raises(ValueError):
        HotCache(-1)


def test_write_back_into_a_real_store(tmp_path):
    """Dirty states evicted from the cache are committed to the store; the cache's generation
    check then agrees with the store's."""
    with redis_server(tmp_path / "redis") as server:
        store = make_store(server.url, f"t{uuid.uuid4().hex[:8]}")
        try:
            def write_back(sid: str, value: Blob, generation: int) -> int:
                return store.put(sid, value.to_bytes(), fingerprint="f").generation

            cache: HotCache[Blob] = HotCache(2_000, write_back=write_back)
            sids = [store.create("acme").id for _ in range(3)]
            for i, sid in enumerate(sids):
                cache.put(sid, Blob(str(i), 1_000), generation=store.generation(sid), dirty=True)
            assert store.get(sids[0])[0] == b"0" * 1_000  # evicted, so written back
            assert store.generation(sids[1]) == 0  # still only in the cache
            cache.flush()
            for i, sid in enumerate(sids[1:], start=1):
                assert store.get(sid)[0] == str(i).encode() * 1_000
                assert cache.get(sid, store.generation(sid)) is not None  # fresh
            store.put(sids[2], b"changed elsewhere", fingerprint="f")
            assert cache.get(sids[2], store.generation(sids[2])) is None  # stale now
        finally:
            store.close()
