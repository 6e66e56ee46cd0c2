"""Everything stored that decides what is served is checked (issue 28, findings 2 to 5): one damaged
field breaks its own session only (listed as broken, deletable); counters live in the sealed
manifest; with ATLAS_STATE_KEY a state written without the key is refused; the per-tenant cap holds
under concurrent creates; a lease whose runtime is gone is taken over at once."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis

from atlas.engine.store import (
    LeaseConflictError,
    NoStateError,
    StateCorruptError,
    TooManySessionsError,
)
from atlas.engine.store.integrity import ManifestSeal, part_digest

from .store_helpers import make_store

PART = 64 << 10


@pytest.fixture
def raw(standalone_redis):
    r = redis.Redis(port=standalone_redis.port, decode_responses=True)
    yield r
    r.close()


def _hash(key_prefix: str, sid: str) -> str:
    return f"{key_prefix}:{{{sid}}}:s"


def _sessions(store, n: int = 3, tenant: str = "acme") -> list[tuple[str, bytes]]:
    out = []
    for _ in range(n):
        sid = store.create(tenant, fingerprint="fp").id
        data = os.urandom(2 * PART + 7)
        store.put(sid, data, fingerprint="fp", tokens=40, bytes_committed=100)
        out.append((sid, data))
    return out


# -- finding 2: one damaged field breaks one session only ---------------------------------------------

FIELDS = ["tenant", "created", "updated", "tokens", "bytes_committed", "state_bytes", "fingerprint", "gen",
          "wid", "ttl_s", "extra", "manifest"]


def _flip(value: str) -> str:
    """One byte changed: a digit moves on, anything else becomes a character no field holds."""
    if not value:
        return "\x01"
    i = len(value) // 2
    c = value[i]
    new = str((int(c) + 1) % 10) if c.isdigit() else ("#" if c != "#" else "$")
    return value[:i] + new + value[i + 1:]


@pytest.mark.parametrize("field", FIELDS)
def test_one_damaged_field_never_blocks_the_tenant(redis_store, raw, key_prefix, field):
    (bad, _), *healthy = _sessions(redis_store, 3)
    raw.hset(_hash(key_prefix, bad), field, _flip(raw.hget(_hash(key_prefix, bad), field) or ""))
    listed = {m.id: m for m in redis_store.list("acme")}
    assert set(listed) == {bad} | {sid for sid, _ in healthy}  # the broken one is listed, not hidden
    for sid, data in healthy:
        assert listed[sid].broken is None and redis_store.get(sid)[0] == data
    redis_store.create("acme", fingerprint="fp", max_sessions=10)  # create and fork still work
    if field in ("created", "updated", "ttl_s"):
        # times: a changed digit is still a time; they decide nothing that is served
        pass
    else:
        assert listed[bad].broken, field
        with pytest.raises(StateCorruptError):
            redis_store.get(bad)
    redis_store.delete(bad, tenant="acme")  # a broken session can always be deleted
    assert bad not in {m.id for m in redis_store.list("acme")}
    assert not raw.keys(f"{key_prefix}:{{{bad}}}:p:*")


@pytest.mark.parametrize("field,value", [("created", "garbage"), ("updated", "nan"), ("ttl_s", "x"),
                                         ("extra", "{not json"), ("extra", "[1]")])
def test_unreadable_loose_fields_are_a_broken_session(redis_store, raw, key_prefix, field, value):
    (bad, _), (good, data) = _sessions(redis_store, 2)
    raw.hset(_hash(key_prefix, bad), field, value)
    listed = {m.id: m for m in redis_store.list("acme")}
    assert listed[bad].broken and listed[good].broken is None
    with pytest.raises(StateCorruptError):
        redis_store.meta(bad)
    assert redis_store.get(good)[0] == data
    redis_store.delete(bad, tenant="acme")


# -- finding 3: what is served is what was sealed ----------------------------------------------------

@pytest.mark.parametrize("field,value", [("gen", "0"), ("tokens", "1"), ("bytes_committed", "0"),
                                         ("state_bytes", "5"), ("fingerprint", "other"), ("tenant", "evil")])
def test_counters_changed_in_redis_are_refused_not_served(redis_store, raw, key_prefix, field, value):
    (sid, _), = _sessions(redis_store, 1)
    raw.hset(_hash(key_prefix, sid), field, value)
    with pytest.raises(StateCorruptError):
        redis_store.get(sid)
    with pytest.raises(StateCorruptError):
        redis_store.meta(sid)


def test_gen_zero_does_not_empty_a_session(redis_store, raw, key_prefix):
    (sid, _), = _sessions(redis_store, 1)
    raw.hset(_hash(key_prefix, sid), "gen", "0")
    with pytest.raises(StateCorruptError):  # not NoStateError: that would be an empty session
        redis_store.get(sid)


def _forge_part(raw, key_prefix: str, sid: str, seal: ManifestSeal | None) -> None:
    """What someone with write access to Redis can do: rewrite part 0, recompute its checksum in the
    manifest, and re-seal the manifest with what he holds (no key, or a wrong one)."""
    hk = _hash(key_prefix, sid)
    m = json.loads(raw.hget(hk, "manifest"))
    key = f"{key_prefix}:{{{sid}}}:p:{m['wid']}:0"
    forged = b"\0" * m["parts"][0][0]
    with redis.Redis(port=raw.connection_pool.connection_kwargs["port"]) as binary:
        binary.set(key, forged)
    m["parts"][0][1] = part_digest(forged, m["hash"])
    raw.hset(hk, "manifest", json.dumps((seal or ManifestSeal()).seal(m)))


def test_without_a_key_a_recomputed_seal_is_accepted(redis_store, raw, key_prefix):
    """The limit of the unkeyed seal, documented: it catches damage, not an adversary."""
    (sid, _), = _sessions(redis_store, 1)
    _forge_part(raw, key_prefix, sid, None)
    assert redis_store.get(sid)[0][:PART] == b"\0" * PART


@pytest.mark.parametrize("forger", ["no key", "wrong key"])
def test_with_a_key_a_forged_state_is_refused(standalone_redis, raw, key_prefix, forger):
    store = make_store(standalone_redis.url, key_prefix, state_key="k-1")
    try:
        (sid, data), (good, good_data) = _sessions(store, 2)
        assert json.loads(raw.hget(_hash(key_prefix, sid), "manifest"))["hash"] == "blake2b"
        _forge_part(raw, key_prefix, sid, None if forger == "no key" else ManifestSeal("guess"))
        with pytest.raises(StateCorruptError):
            store.get(sid)
        assert store.get(good)[0] == good_data
    finally:
        store.close()


def test_key_rotation(standalone_redis, key_prefix):
    old = make_store(standalone_redis.url, key_prefix, state_key="k-old")
    new = make_store(standalone_redis.url, key_prefix, state_key="k-new", state_keys_old="k-old")
    plain = make_store(standalone_redis.url, key_prefix)
    try:
        (sid, data), = _sessions(old, 1)
        assert new.get(sid)[0] == data  # sealed with the old key: still read
        new.put(sid, data[::-1], fingerprint="fp")  # the next commit seals with the new key
        assert new.get(sid)[0] == data[::-1]
        with pytest.raises(StateCorruptError):
            old.get(sid)  # a server without the new key refuses it
        with pytest.raises(StateCorruptError):
            plain.get(sid)
        (unsealed, _), = _sessions(plain, 1)
        with pytest.raises(StateCorruptError):
            new.get(unsealed)  # with a key, a state sealed without one is refused
    finally:
        for s in (old, new, plain):
            s.close()


def test_format_1_manifests_are_still_read_without_a_key(redis_store, raw, key_prefix):
    """Sessions stored before the seal existed load, and the next commit rewrites them."""
    (sid, data), = _sessions(redis_store, 1)
    hk = _hash(key_prefix, sid)
    m = json.loads(raw.hget(hk, "manifest"))
    v1 = {"v": 1, "wid": m["wid"], "fingerprint": m["fingerprint"], "size": m["size"], "hash": m["hash"],
          "parts": m["parts"]}
    raw.hset(hk, "manifest", json.dumps(v1))
    got, meta = redis_store.get(sid)
    assert got == data and meta.tokens == 40 and meta.bytes_committed == 100 and meta.generation == 1
    redis_store.put(sid, data, fingerprint="fp")
    assert json.loads(raw.hget(hk, "manifest"))["v"] == 2
    assert redis_store.meta(sid).tokens == 40


# -- finding 4: the per-tenant cap ---------------------------------------------------------------

def test_concurrent_creates_and_forks_never_pass_the_cap(standalone_redis, key_prefix):
    stores = [make_store(standalone_redis.url, key_prefix) for _ in range(4)]
    try:
        data = os.urandom(PART)
        barrier = threading.Barrier(24)
        refused: list[int] = []
        errors: list[Exception] = []

        def one(i: int) -> None:
            s = stores[i % len(stores)]
            barrier.wait()
            try:
                if i % 2:
                    s.create("acme", fingerprint="fp", max_sessions=10)
                else:  # a fork: a create with a first state
                    s.create("acme", fingerprint="fp", data=data, tokens=3, max_sessions=10)
            except TooManySessionsError:
                refused.append(i)
            except Exception as e:  # noqa: BLE001 - shown by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(stores[0].list("acme")) == 10 and len(refused) == 14
    finally:
        for s in stores:
            s.close()


def test_the_cap_counts_live_sessions_only(redis_store, raw, key_prefix):
    a = redis_store.create("acme", max_sessions=2)
    redis_store.create("acme", max_sessions=2, ttl_s=1)
    with pytest.raises(TooManySessionsError) as e:
        redis_store.create("acme", max_sessions=2)
    assert e.value.code == "too_many_sessions"
    redis_store.delete(a.id)
    redis_store.create("acme", max_sessions=2)  # a delete frees a place
    time.sleep(1.2)  # the session with a TTL expires: its place is found at the cap
    redis_store.create("acme", max_sessions=2)
    assert len(redis_store.list("acme")) == 2
    redis_store.create("other", max_sessions=2)  # another tenant's count is its own


def test_create_lists_nothing(redis_store, raw):
    for _ in range(50):
        redis_store.create("acme", max_sessions=1000)
    raw.config_resetstat()
    redis_store.create("acme", max_sessions=1000)
    stats = raw.info("commandstats")
    assert "cmdstat_smembers" not in stats and "cmdstat_hmget" not in stats
    assert "cmdstat_scard" not in stats or stats["cmdstat_scard"]["calls"] <= 1  # counted in the script


# -- finding 5: a lease whose holder is gone ----------------------------------------------------------

def test_a_lease_of_a_dead_runtime_is_taken_over_at_once(redis_store, standalone_redis, key_prefix):
    other = make_store(standalone_redis.url, key_prefix)
    try:
        sid = redis_store.create("acme").id
        redis_store.heartbeat("runtime-dead", 300)
        dead = redis_store.lease(sid, "runtime-dead", ttl_ms=60_000)
        with pytest.raises(LeaseConflictError) as e:  # while its heartbeat lives, it holds
            other.lease(sid, "runtime-b")
        assert e.value.retry_after_ms is not None and e.value.retry_after_ms <= 300
        time.sleep(0.4)  # three heartbeats missed: the runtime is gone
        t0 = time.monotonic()
        with other.lease(sid, "runtime-b") as b:
            assert b.fence == dead.fence + 1 and time.monotonic() - t0 < 1
            with pytest.raises(LeaseConflictError):  # the dead holder's fence is stale
                redis_store.put(sid, b"late", fingerprint="", fence=dead.fence)
    finally:
        other.close()


def test_a_lease_of_an_owner_without_heartbeat_waits_for_its_ttl(redis_store):
    sid = redis_store.create("acme").id
    redis_store.lease(sid, "replica-a", ttl_ms=60_000)
    with pytest.raises(LeaseConflictError):
        redis_store.lease(sid, "replica-b")


def test_an_owner_reclaims_its_own_leftover_lease(redis_store):
    sid = redis_store.create("acme").id
    first = redis_store.lease(sid, "runtime-me", ttl_ms=60_000)  # its release was lost
    redis_store.heartbeat("runtime-me", 60_000)
    with pytest.raises(LeaseConflictError):
        redis_store.lease(sid, "runtime-me")  # without reclaim, a lease is a lease
    again = redis_store.lease(sid, "runtime-me", reclaim=True)
    assert again.fence == first.fence + 1 and again.held and not first.held
    again.release()


def test_an_empty_session_with_a_missing_manifest_is_refused_with_a_key(standalone_redis, raw, key_prefix):
    store = make_store(standalone_redis.url, key_prefix, state_key="k")
    try:
        sid = store.create("acme").id
        with pytest.raises(NoStateError):
            store.get(sid)
        raw.hdel(_hash(key_prefix, sid), "manifest")
        with pytest.raises(StateCorruptError):
            store.get(sid)
    finally:
        store.close()


# -- through HTTP: the tenant keeps working beside a broken session; forks respect the cap ----------

def test_http_a_broken_session_is_listed_and_deletable_and_blocks_nothing(standalone_redis, key_prefix):
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    from atlas.server.app import create_app
    from atlas.server.settings import ServerSettings

    from .helpers import tiny_atlas

    atlas = tiny_atlas()
    store = make_store(standalone_redis.url, key_prefix)
    headers = {"Authorization": "Bearer k"}
    app = create_app(ServerSettings(api_keys="k:acme,j:other", max_sessions_per_tenant=6), atlas=atlas,
                     store=store)
    with TestClient(app, raise_server_exceptions=False) as c, \
            redis.Redis(port=standalone_redis.port, decode_responses=True) as raw:
        bad, good = (c.post("/v1/sessions", headers=headers).json()["id"] for _ in range(2))
        assert c.post(f"/v1/sessions/{good}/ingest", headers=headers, content=b"hello").status_code == 200
        raw.hset(_hash(key_prefix, bad), "created", "not a time")
        listed = {s["id"]: s for s in c.get("/v1/sessions", headers=headers).json()["data"]}
        assert listed[bad]["broken"] and listed[good]["broken"] is None
        assert c.get(f"/v1/sessions/{bad}", headers=headers).json()["error"]["code"] == "state_corrupt"
        other = {"Authorization": "Bearer j"}
        assert c.delete(f"/v1/sessions/{bad}", headers=other).status_code == 404  # not theirs
        # forks race for the 4 places left: the cap holds
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: c.post(f"/v1/sessions/{good}/fork", headers=headers).status_code,
                                  range(8)))
        assert sorted(codes) == [201] * 4 + [429] * 4
        assert c.post("/v1/sessions", headers=headers).json()["error"]["code"] == "too_many_sessions"
        assert c.delete(f"/v1/sessions/{bad}", headers=headers).status_code == 204
        assert c.post("/v1/sessions", headers=headers).status_code == 201  # its place is free again
        assert len(c.get("/v1/sessions", headers=headers).json()["data"]) == 6
