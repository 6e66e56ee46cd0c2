"""One writer per session: leases (SET NX PX) with fencing tokens, on a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from atlas.engine.store import LeaseConflictError, StateNotFoundError

from .store_helpers import make_store


@pytest.fixture
def other(standalone_redis, redis_store):
    """A second store object (another replica) on the same keys."""
    s = make_store(standalone_redis.url, redis_store.settings.key_prefix)
    yield s
    s.close()


def test_second_writer_gets_a_conflict(redis_store, other):
    sid = redis_store.create("acme").id
    with redis_store.lease(sid, "replica-a") as a:
        assert a.held and a.fence == 1
        with pytest.raises(LeaseConflictError) as e:
            other.lease(sid, "replica-b")
        assert e.value.code == "lease_conflict"
        assert "replica-a" in str(e.value)
        # the holder commits; a writer without the lease is refused, fenced or not
        redis_store.put(sid, b"from a", fingerprint="f", fence=a.fence)
        with pytest.raises(LeaseConflictError):
            other.put(sid, b"from b", fingerprint="f")
        with pytest.raises(LeaseConflictError):
            other.put(sid, b"from b", fingerprint="f", fence=a.fence + 1)
        with pytest.raises(LeaseConflictError):
            other.update(sid, tokens=5)
        with pytest.raises(LeaseConflictError):
            other.delete(sid)
        a.renew(5_000)
    assert not a.held
    with other.lease(sid, "replica-b") as b:
        assert b.fence == 2
        other.put(sid, b"from b", fingerprint="f", fence=b.fence)
    assert redis_store.get(sid)[0] == b"from b"
    assert other.stats.conflicts >= 5


def test_expired_holder_cannot_commit_after_another_took_the_lease(redis_store, other):
    sid = redis_store.create("acme").id
    redis_store.put(sid, b"v0", fingerprint="f")
    a = redis_store.lease(sid, "slow-writer", ttl_ms=100)
    time.sleep(0.15)  # a stalls past its TTL (GC pause, network partition...)
    assert not a.held
    b = other.lease(sid, "new-writer", ttl_ms=5_000)
    assert b.fence > a.fence
    with pytest.raises(LeaseConflictError):
        redis_store.put(sid, b"stale write", fingerprint="f", fence=a.fence)
    with pytest.raises(LeaseConflictError):
        a.renew()
    a.release()  # must not release b's lease
    assert b.held
    other.put(sid, b"v1", fingerprint="f", fence=b.fence)
    b.release()
    assert redis_store.get(sid)[0] == b"v1"
    # even after b let go, a's fence stays stale: a later lease was granted
    with pytest.raises(LeaseConflictError):
        redis_store.put(sid, b"stale write", fingerprint="f", fence=a.fence)
    assert redis_store.get(sid)[0] == b"v1" and redis_store.generation(sid) == 2


def test_expired_lease_nobody_took_still_fences(redis_store):
    """Fencing is "no later lease was granted": a lapsed but unchallenged holder may still commit,
    and an unfenced writer may commit once the lease lapsed."""
    sid = redis_store.create("acme").id
    a = redis_store.lease(sid, ttl_ms=50)
    time.sleep(0.08)
    redis_store.put(sid, b"late but unchallenged", fingerprint="f", fence=a.fence)
    redis_store.put(sid, b"unfenced", fingerprint="f")
    assert redis_store.get(sid)[0] == b"unfenced"


def test_wait_for_the_lease(redis_store, other):
    sid = redis_store.create("acme").id
    a = redis_store.lease(sid, ttl_ms=5_000)
    threading.Timer(0.1, a.release).start()
    t0 = time.monotonic()
    with other.lease(sid, wait_ms=3_000) as b:
        assert 0.05 < time.monotonic() - t0 < 2 and b.fence == a.fence + 1
    c = redis_store.lease(sid, ttl_ms=150)
    with other.lease(sid, wait_ms=3_000) as d:  # waits for c to expire
        assert d.fence == c.fence + 1
    with pytest.raises(StateNotFoundError):
        redis_store.lease("no-such-session")


def test_fence_survives_delete_and_recreate(redis_store, other):
    sid = redis_store.create("acme", sid=f"s-{uuid.uuid4().hex[:6]}").id
    a = redis_store.lease(sid)
    redis_store.delete(sid, fence=a.fence)
    assert not a.held
    redis_store.create("acme", sid=sid)
    with other.lease(sid) as b:
        assert b.fence > a.fence
    with pytest.raises(LeaseConflictError):
        redis_store.put(sid, b"zombie", fingerprint="f", fence=a.fence)


def test_leased_read_modify_write_loses_no_update(redis_store, standalone_redis):
    """Writers on several store objects each add 1, under the lease: no increment is lost."""
    sid = redis_store.create("acme").id
    redis_store.put(sid, (0).to_bytes(8, "big"), fingerprint="f")
    stores = [make_store(standalone_redis.url, redis_store.settings.key_prefix) for _ in range(3)]
    errors: list[BaseException] = []

    def worker(s) -> None:
        try:
            for _ in range(10):
                with s.lease(sid, wait_ms=10_000) as lease:
                    n = int.from_bytes(s.get(sid)[0], "big")
                    s.put(sid, (n + 1).to_bytes(8, "big"), fingerprint="f", fence=lease.fence)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for s in stores:
        s.close()
    assert not errors, errors
    assert int.from_bytes(redis_store.get(sid)[0], "big") == 30
