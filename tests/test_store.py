"""State store on a real redis-server: round trips, metadata, integrity, concurrent commits."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest
import redis

from atlas.engine.store import (
    ForeignModelError,
    LeaseConflictError,
    NoStateError,
    SessionExistsError,
    StateCorruptError,
    StateNotFoundError,
    StoreError,
    StoreSettings,
    StoreUnavailableError,
    open_store,
)

from .store_helpers import make_store, redis_server

PART = 64 << 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(server, prefix):
    s = make_store(server.url, prefix, part_bytes=PART)
    yield s
    s.close()


@pytest.fixture
def raw(server):
    r = redis.Redis(port=server.port)
    yield r
    r.close()


def part_keys(raw: redis.Redis, prefix: str, sid: str) -> list[str]:
    """The committed generation's part keys, from the manifest (see redis_store's layout)."""
    m = json.loads(raw.hget(f"{prefix}:{{{sid}}}:s", "manifest"))
    return [f"{prefix}:{{{sid}}}:p:{m['wid']}:{i}" for i in range(len(m["parts"]))]


SIZES = [0, 1, PART - 1, PART, PART + 1, 2 * PART, 3 * PART + 17, (1 << 20) + 5]


@pytest.mark.parametrize("n", SIZES)
def test_round_trip_is_bit_exact(store, n):
    data = os.urandom(n)
    meta = store.create("acme", fingerprint="fp-a")
    assert meta.generation == 0 and meta.state_bytes == 0
    saved = store.put(meta.id, data, fingerprint="fp-a", tokens=n // 3, bytes_committed=n)
    assert saved.generation == 1 and saved.state_bytes == n and saved.tokens == n // 3
    got, m = store.get(meta.id, expected_fingerprint="fp-a")
    assert got == data and type(got) is bytes
    assert m == saved == store.meta(meta.id)


def test_buffers_generations_and_metadata(store, raw, prefix):
    meta = store.create("acme", fingerprint="fp", extra={"doc": "x"}, ttl_s=None)
    assert store.generation(meta.id) == 0
    with pytest.raises(NoStateError) as e:
        store.get(meta.id)
    assert e.value.code == "state_not_found"
    payloads = [bytearray(os.urandom(3 * PART + 5)), memoryview(os.urandom(PART)), os.urandom(10)]
    for g, p in enumerate(payloads, start=1):
        m = store.put(meta.id, p, fingerprint="fp")
        assert m.generation == g == store.generation(meta.id)
        assert store.get(meta.id)[0] == bytes(p)
        assert m.extra == {"doc": "x"} and m.created == meta.created and m.updated >= m.created
    # the old generations' parts are gone: only the current parts remain
    keys = {k.decode() for k in raw.scan_iter(f"{prefix}:{{{meta.id}}}:p:*")}
    assert keys == set(part_keys(raw, prefix, meta.id))
    m = store.update(meta.id, tokens=7, bytes_committed=9, extra={"k": [1, 2]})
    assert (m.tokens, m.bytes_committed, m.extra, m.generation) == (7, 9, {"k": [1, 2]}, 3)
    m2 = store.put(meta.id, b"abc", fingerprint="fp")  # fields not given are kept
    assert (m2.tokens, m2.bytes_committed, m2.extra) == (7, 9, {"k": [1, 2]})


def test_create_list_delete(store, raw, prefix):
    a = store.create("acme", sid="s-1")
    b = store.create("acme", data=b"hello", fingerprint="f")
    c = store.create("other")
    assert b.generation == 1 and store.get(b.id)[0] == b"hello"
    with pytest.raises(SessionExistsError) as e:
        store.create("acme", sid="s-1")
    assert e.value.code == "session_exists"
    assert [m.id for m in store.list("acme")] == [a.id, b.id]
    assert [m.id for m in store.list("other")] == [c.id]
    assert store.list("nobody") == []
    store.delete(b.id)
    with pytest.raises(StateNotFoundError) as e:
        store.get(b.id)
    assert e.value.code == "session_not_found" and e.value.http_status == 404
    with pytest.raises(StateNotFoundError):
        store.delete(b.id)
    assert [m.id for m in store.list("acme")] == [a.id]
    # nothing of b is left but its fencing counter, which expires
    left = [k.decode() for k in raw.scan_iter(f"{prefix}:{{{b.id}}}*")]
    assert all(k.endswith(":fence") and raw.pttl(k) > 0 for k in left)
    for bad in ("", "a b", "x{y}", "é", "a" * 201):
        with pytest.raises(ValueError):
            store.create("acme", sid=bad)
        with pytest.raises(ValueError):
            store.create(bad)


def test_ttl_expires_session_and_its_parts(store, raw, prefix):
    m = store.create("acme", ttl_s=1)
    store.put(m.id, os.urandom(3 * PART), fingerprint="f")
    keys = [f"{prefix}:{{{m.id}}}:s", *part_keys(raw, prefix, m.id)]
    assert all(0 < raw.pttl(k) <= 1000 for k in keys)
    assert store.meta(m.id).ttl_s == 1
    time.sleep(1.2)
    with pytest.raises(StateNotFoundError):
        store.meta(m.id)
    assert store.list("acme") == []
    assert not list(raw.scan_iter(f"{prefix}:{{{m.id}}}:[sp]*"))


# -- integrity ------------------------------------------------------------------------------------

def _two_sessions(store):
    bad = store.create("acme", fingerprint="fp")
    good = store.create("acme", fingerprint="fp")
    data = os.urandom(4 * PART + 100)
    store.put(bad.id, data, fingerprint="fp")
    store.put(good.id, data, fingerprint="fp")
    return bad.id, good.id, data


@pytest.mark.parametrize("which", [0, 2, -1])
@pytest.mark.parametrize("damage", ["flip", "delete", "truncate", "extend"])
def test_damaged_part_is_refused(store, raw, prefix, damage, which):
    bad, good, data = _two_sessions(store)
    key = part_keys(raw, prefix, bad)[which]
    blob = bytearray(raw.get(key))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
        raw.set(key, bytes(blob))
    elif damage == "delete":
        raw.delete(key)
    elif damage == "truncate":
        raw.set(key, bytes(blob[:-1]))
    else:
        raw.append(key, b"\0")
    with pytest.raises(StateCorruptError) as e:
        store.get(bad)
    assert e.value.code == "state_corrupt" and isinstance(e.value, StoreError)
    assert store.get(good)[0] == data  # other sessions are unaffected
    assert store.stats.corrupt == 1
    # a new commit replaces the broken state
    store.put(bad, b"fresh", fingerprint="fp")
    assert store.get(bad)[0] == b"fresh"


def test_foreign_fingerprint_is_refused(store, raw, prefix):
    bad, good, data = _two_sessions(store)
    with pytest.raises(ForeignModelError) as e:
        store.get(bad, expected_fingerprint="another-model")
    assert e.value.code == "foreign_model"
    assert store.get(bad, expected_fingerprint="fp")[0] == data
    assert store.get(bad)[0] == data  # no expectation, no check
    # a manifest whose fingerprint was changed behind the store's back is refused too
    hk = f"{prefix}:{{{bad}}}:s"
    m = json.loads(raw.hget(hk, "manifest"))
    m["fingerprint"] = "another-model"
    raw.hset(hk, "manifest", json.dumps(m))
    with pytest.raises(StateCorruptError):
        store.get(bad, expected_fingerprint="fp")
    raw.hset(hk, "fingerprint", "another-model")
    with pytest.raises(ForeignModelError):
        store.get(bad, expected_fingerprint="fp")
    assert store.get(good, expected_fingerprint="fp")[0] == data


@pytest.mark.parametrize("manifest", ["", "{", '{"v": 1}', "[]"])
def test_unreadable_manifest_is_refused(store, raw, prefix, manifest):
    bad, good, data = _two_sessions(store)
    raw.hset(f"{prefix}:{{{bad}}}:s", "manifest", manifest)
    with pytest.raises(StateCorruptError):
        store.get(bad)
    assert store.get(good)[0] == data


def test_checksum_setting_and_mixed_manifests(server, prefix):
    """Loads use the algorithm the manifest names, whatever the store's current setting."""
    a = make_store(server.url, prefix, state_checksum="crc32")
    b = make_store(server.url, prefix, state_checksum="sha256")
    try:
        m = a.create("acme")
        data = os.urandom(5 * PART)
        a.put(m.id, data, fingerprint="f")
        assert b.get(m.id)[0] == data
        b.put(m.id, data[::-1], fingerprint="f")
        assert a.get(m.id)[0] == data[::-1]
    finally:
        a.close()
        b.close()


# -- concurrency ----------------------------------------------------------------------------------

def test_readers_never_see_a_mix_while_writers_commit(store):
    """Writers commit new generations while readers load: every load is one committed payload."""
    sid = store.create("acme").id
    payloads = [bytes([i]) * ((i % 5 + 1) * PART + i) for i in range(40)]
    store.put(sid, payloads[0], fingerprint="f")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                data, meta = store.get(sid)
                assert data in payloads
                seen.append(meta.generation)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for p in payloads[1:]:
        store.put(sid, p, fingerprint="f")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen and store.get(sid)[0] == payloads[-1]


def test_unfenced_writers_racing_lose_no_update_silently(store):
    """Two writers without a lease: each commit either lands or is refused as a conflict."""
    sid = store.create("acme").id
    results: dict[str, list[str]] = {"ok": [], "conflict": []}
    lock = threading.Lock()

    def writer(name: str) -> None:
        for i in range(15):
            tag = f"{name}-{i}".encode()
            try:
                store.put(sid, tag * 20000, fingerprint="f")
                outcome = "ok"
            except LeaseConflictError:
                outcome = "conflict"
            with lock:
                results[outcome].append(tag.decode())

    ts = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(results["ok"]) + len(results["conflict"]) == 30
    assert store.generation(sid) == len(results["ok"])  # one generation per accepted commit
    data = store.get(sid)[0]
    assert data[: len(data) // 20000].decode() in results["ok"]


def test_unreachable_redis_is_a_typed_error(tmp_path):
    s = make_store("redis://127.0.0.1:1/0", "x", socket_timeout_s=1)
    try:
        assert s.ping() is False
        with pytest.raises(StoreUnavailableError) as e:
            s.meta("abc")
        assert e.value.code == "store_unavailable" and e.value.http_status == 503
    finally:
        s.close()


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("ATLAS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATLAS_PART_BYTES", "1024")
    monkeypatch.setenv("ATLAS_SOMETHING_ELSE", "ignored")
    s = StoreSettings()
    assert (s.redis_url, s.data_dir, s.part_bytes) == ("redis://example:6380/2", tmp_path, 1024)
    monkeypatch.delenv("ATLAS_REDIS_URL")
    assert StoreSettings().redis_url is None
    with pytest.raises(ValueError):
        StoreSettings(key_prefix="a{b}")


def test_open_store_on_url_and_stats(server, prefix):
    with open_store(StoreSettings(redis_url=server.url, key_prefix=prefix, part_bytes=PART)) as s:
        assert s.ping()
        sid = s.create("acme").id
        s.put(sid, os.urandom(PART * 2), fingerprint="f")
        s.get(sid)
        st = s.stats
        assert st.saves.count == 1 and st.loads.count == 1
        assert st.saves.bytes == st.loads.bytes == PART * 2
        assert sum(st.saves.buckets) == 1 and st.saves.total_s > 0
