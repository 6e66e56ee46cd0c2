"""State store on a real redis-server: round trips, metadata, integrity, concurrent commits."""

from __future__ import annotations

import json
import os
import threading
import time

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
    StoreFullError,
    StoreSettings,
    StoreUnavailableError,
    open_store,
)

from .store_helpers import make_store

PART = 64 << 10


@pytest.fixture
def raw(standalone_redis):
    """A plain client, to see and damage what the store wrote."""
    r = redis.Redis(port=standalone_redis.port)
    yield r
    r.close()


def part_keys(raw: redis.Redis, key_prefix: str, sid: str) -> list[str]:
    """The committed generation's part keys, from the manifest (see redis_store's layout)."""
    m = json.loads(raw.hget(f"{key_prefix}:{{{sid}}}:s", "manifest"))
    return [f"{key_prefix}:{{{sid}}}:p:{m['wid']}:{i}" for i in range(len(m["parts"]))]


SIZES = [0, 1, PART - 1, PART, PART + 1, 2 * PART, 3 * PART + 17, (1 << 20) + 5]


@pytest.mark.parametrize("n", SIZES)
def test_round_trip_is_bit_exact(redis_store, n):
    data = os.urandom(n)
    meta = redis_store.create("acme", fingerprint="fp-a")
    assert meta.generation == 0 and meta.state_bytes == 0
    saved = redis_store.put(meta.id, data, fingerprint="fp-a", tokens=n // 3, bytes_committed=n)
    assert saved.generation == 1 and saved.state_bytes == n and saved.tokens == n // 3
    got, m = redis_store.get(meta.id, expected_fingerprint="fp-a")
    assert got == data and type(got) is bytes
    assert m == saved == redis_store.meta(meta.id)


def test_buffers_generations_and_metadata(redis_store, raw, key_prefix):
    meta = redis_store.create("acme", fingerprint="fp", extra={"doc": "x"}, ttl_s=None)
    assert redis_store.generation(meta.id) == 0
    with pytest.raises(NoStateError) as e:
        redis_store.get(meta.id)
    assert e.value.code == "state_not_found"
    payloads = [bytearray(os.urandom(3 * PART + 5)), memoryview(os.urandom(PART)), os.urandom(10)]
    for g, p in enumerate(payloads, start=1):
        m = redis_store.put(meta.id, p, fingerprint="fp")
        assert m.generation == g == redis_store.generation(meta.id)
        assert redis_store.get(meta.id)[0] == bytes(p)
        assert m.extra == {"doc": "x"} and m.created == meta.created and m.updated >= m.created
    # the old generations' parts are gone: only the current parts remain
    keys = {k.decode() for k in raw.scan_iter(f"{key_prefix}:{{{meta.id}}}:p:*")}
    assert keys == set(part_keys(raw, key_prefix, meta.id))
    m = redis_store.update(meta.id, tokens=7, bytes_committed=9, extra={"k": [1, 2]})
    assert (m.tokens, m.bytes_committed, m.extra, m.generation) == (7, 9, {"k": [1, 2]}, 3)
    m2 = redis_store.put(meta.id, b"abc", fingerprint="fp")  # fields not given are kept
    assert (m2.tokens, m2.bytes_committed, m2.extra) == (7, 9, {"k": [1, 2]})


def test_create_list_delete(redis_store, raw, key_prefix):
    a = redis_store.create("acme", sid="s-1")
    b = redis_store.create("acme", data=b"hello", fingerprint="f")
    c = redis_store.create("other")
    assert b.generation == 1 and redis_store.get(b.id)[0] == b"hello"
    with pytest.raises(SessionExistsError) as e:
        redis_store.create("acme", sid="s-1")
    assert e.value.code == "session_exists"
    assert [m.id for m in redis_store.list("acme")] == [a.id, b.id]
    assert [m.id for m in redis_store.list("other")] == [c.id]
    assert redis_store.list("nobody") == []
    redis_store.delete(b.id)
    with pytest.raises(StateNotFoundError) as e:
        redis_store.get(b.id)
    assert e.value.code == "session_not_found"
    with pytest.raises(StateNotFoundError):
        redis_store.delete(b.id)
    assert [m.id for m in redis_store.list("acme")] == [a.id]
    # nothing of b is left but its fencing counter, which expires
    left = [k.decode() for k in raw.scan_iter(f"{key_prefix}:{{{b.id}}}*")]
    assert all(k.endswith(":fence") and raw.pttl(k) > 0 for k in left)
    for bad in ("", "a b", "x{y}", "é", "a" * 201):
        with pytest.raises(ValueError):
            redis_store.create("acme", sid=bad)
        with pytest.raises(ValueError):
            redis_store.create(bad)


def test_ttl_expires_session_and_its_parts(redis_store, raw, key_prefix):
    m = redis_store.create("acme", ttl_s=1)
    redis_store.put(m.id, os.urandom(3 * PART), fingerprint="f")
    keys = [f"{key_prefix}:{{{m.id}}}:s", *part_keys(raw, key_prefix, m.id)]
    assert all(0 < raw.pttl(k) <= 1000 for k in keys)
    assert redis_store.meta(m.id).ttl_s == 1
    time.sleep(1.2)
    with pytest.raises(StateNotFoundError):
        redis_store.meta(m.id)
    assert redis_store.list("acme") == []
    assert not list(raw.scan_iter(f"{key_prefix}:{{{m.id}}}:[sp]*"))


# -- integrity ------------------------------------------------------------------------------------

def _two_sessions(redis_store):
    bad = redis_store.create("acme", fingerprint="fp")
    good = redis_store.create("acme", fingerprint="fp")
    data = os.urandom(4 * PART + 100)
    redis_store.put(bad.id, data, fingerprint="fp")
    redis_store.put(good.id, data, fingerprint="fp")
    return bad.id, good.id, data


@pytest.mark.parametrize("which", [0, 2, -1])
@pytest.mark.parametrize("damage", ["flip", "delete", "truncate", "extend"])
def test_damaged_part_is_refused(redis_store, raw, key_prefix, damage, which):
    bad, good, data = _two_sessions(redis_store)
    key = part_keys(raw, key_prefix, bad)[which]
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
        redis_store.get(bad)
    assert e.value.code == "state_corrupt" and isinstance(e.value, StoreError)
    assert redis_store.get(good)[0] == data  # other sessions are unaffected
    assert redis_store.stats.corrupt == 1
    # a new commit replaces the broken state
    redis_store.put(bad, b"fresh", fingerprint="fp")
    assert redis_store.get(bad)[0] == b"fresh"


def test_foreign_fingerprint_is_refused(redis_store, raw, key_prefix):
    bad, good, data = _two_sessions(redis_store)
    with pytest.raises(ForeignModelError) as e:
        redis_store.get(bad, expected_fingerprint="another-model")
    assert e.value.code == "foreign_model"
    assert redis_store.get(bad, expected_fingerprint="fp")[0] == data
    assert redis_store.get(bad)[0] == data  # no expectation, no check
    # a fingerprint changed behind the store's back (in the manifest, the field, or both) breaks
    # the seal or the agreement of the two: refused as corrupt, never served as another model's
    hk = f"{key_prefix}:{{{bad}}}:s"
    m = json.loads(raw.hget(hk, "manifest"))
    m["fingerprint"] = "another-model"
    raw.hset(hk, "manifest", json.dumps(m))
    with pytest.raises(StateCorruptError):
        redis_store.get(bad, expected_fingerprint="fp")
    raw.hset(hk, "fingerprint", "another-model")
    with pytest.raises(StateCorruptError):
        redis_store.get(bad, expected_fingerprint="fp")
    assert redis_store.get(good, expected_fingerprint="fp")[0] == data


@pytest.mark.parametrize("manifest", ["", "{", '{"v": 1}', "[]"])
def test_unreadable_manifest_is_refused(redis_store, raw, key_prefix, manifest):
    bad, good, data = _two_sessions(redis_store)
    raw.hset(f"{key_prefix}:{{{bad}}}:s", "manifest", manifest)
    with pytest.raises(StateCorruptError):
        redis_store.get(bad)
    assert redis_store.get(good)[0] == data


def test_checksum_setting_and_mixed_manifests(standalone_redis, key_prefix):
    """Loads use the algorithm the manifest names, whatever the store's current setting."""
    a = make_store(standalone_redis.url, key_prefix, state_checksum="crc32")
    b = make_store(standalone_redis.url, key_prefix, state_checksum="sha256")
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

def test_readers_never_see_a_mix_while_writers_commit(redis_store):
    """Writers commit new generations while readers load: every load is one committed payload."""
    sid = redis_store.create("acme").id
    payloads = [bytes([i]) * ((i % 5 + 1) * PART + i) for i in range(40)]
    redis_store.put(sid, payloads[0], fingerprint="f")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                try:
                    data, meta = redis_store.get(sid)
                except LeaseConflictError:
                    continue  # outrun by writers RETRIES times in a row: a retryable 409, never a mix
                assert data in payloads
                seen.append(meta.generation)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for p in payloads[1:]:
        redis_store.put(sid, p, fingerprint="f")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen and redis_store.get(sid)[0] == payloads[-1]


def test_unfenced_writers_racing_lose_no_update_silently(redis_store):
    """Two writers without a lease: each commit either lands or is refused as a conflict."""
    sid = redis_store.create("acme").id
    results: dict[str, list[str]] = {"ok": [], "conflict": []}
    lock = threading.Lock()

    def writer(name: str) -> None:
        for i in range(15):
            tag = f"{name}-{i}".encode()
            try:
                redis_store.put(sid, tag * 20000, fingerprint="f")
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
    assert redis_store.generation(sid) == len(results["ok"])  # one generation per accepted commit
    data = redis_store.get(sid)[0]
    assert data[: len(data) // 20000].decode() in results["ok"]


def test_unreachable_redis_is_a_typed_error(tmp_path):
    s = make_store("redis://127.0.0.1:1/0", "x", socket_timeout_s=1)
    try:
        assert s.ping() is False
        with pytest.raises(StoreUnavailableError) as e:
            s.meta("abc")
        assert e.value.code == "store_unavailable"
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


def test_open_store_on_url_and_stats(standalone_redis, key_prefix):
    settings = StoreSettings(redis_url=standalone_redis.url, key_prefix=key_prefix, part_bytes=PART)
    with open_store(settings) as s:
        assert s.ping()
        sid = s.create("acme").id
        s.put(sid, os.urandom(PART * 2), fingerprint="f")
        s.get(sid)
        st = s.stats
        assert st.saves.count == 1 and st.loads.count == 1
        assert st.saves.bytes == st.loads.bytes == PART * 2
        assert sum(st.saves.buckets) == 1 and st.saves.total_s > 0


def test_a_create_with_state_that_fails_leaves_no_session(tmp_path):
    """A fork or an import writes the new session, then its state: when the state cannot be written
    (here Redis is out of memory), the empty session must not stay behind, counted and listed."""
    from .store_helpers import redis_server

    with redis_server(tmp_path / "redis", "--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as srv:
        store = make_store(srv.url, "oom:")
        first = store.create("t", fingerprint="f", data=b"x" * 100_000)
        with pytest.raises(StoreFullError, match="out of memory"):
            for _ in range(200):  # until Redis refuses writes
                store.create("t", fingerprint="f", data=os.urandom(200_000))
        listed = store.list("t")
        assert first.id in {m.id for m in listed}
        assert all(m.state_bytes > 0 for m in listed), [m for m in listed if not m.state_bytes]
