"""The same store code on a local 3-master Redis Cluster (skipped without redis-cli)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from atlas.engine.store import LeaseConflictError, StateCorruptError

from .store_helpers import RedisServer, make_store

PART = 64 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cli = os.environ.get("ATLAS_TEST_REDIS_CLI") or shutil.which("redis-cli")
    if not cli:
        pytest.skip("redis-cli is not installed")
    root = tmp_path_factory.mktemp("cluster")
    nodes = [RedisServer(root / f"n{i}", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                         "--appendonly", "no") for i in range(3)]
    try:
        for n in nodes:
            n.start()
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        for n in nodes:
            r = redis.Redis(port=n.port)
            while r.cluster("info")["cluster_state"] != "ok":
                if time.monotonic() > deadline:
                    pytest.fail("cluster did not converge")
                time.sleep(0.05)
            r.close()
        yield nodes
    finally:
        for n in nodes:
            n.kill()


@pytest.fixture
def store(cluster):
    s = make_store(cluster[0].url, f"t{uuid.uuid4().hex[:8]}", cluster=True, part_bytes=PART)
    yield s
    s.close()


def test_cluster_round_trip_many_slots(store, cluster):
    sids = []
    for n in [0, 1, PART, 3 * PART + 1, 20 * PART + 5]:
        data = os.urandom(n)
        m = store.create("acme", fingerprint="fp")
        store.put(m.id, data, fingerprint="fp", tokens=n)
        assert store.get(m.id, expected_fingerprint="fp")[0] == data
        sids.append(m.id)
    # the sessions spread over the masters, each session's keys in one slot
    rc = store.client
    keys = [f"{store.settings.key_prefix}:{{{sid}}}:s" for sid in sids]
    assert len({rc.keyslot(k) for k in keys}) == len(sids)
    assert len({rc.get_node_from_key(k).port for k in keys}) >= 2
    assert sorted(m.id for m in store.list("acme")) == sorted(sids)
    store.delete(sids[0])
    assert sorted(m.id for m in store.list("acme")) == sorted(sids[1:])


def test_cluster_lease_and_integrity(store):
    m = store.create("acme")
    with store.lease(m.id, "a") as lease:
        with pytest.raises(LeaseConflictError):
            store.lease(m.id, "b")
        store.put(m.id, os.urandom(4 * PART), fingerprint="f", fence=lease.fence)
    meta = store.meta(m.id)
    assert meta.generation == 1
    keys = [k for k in store.client.scan_iter(f"{store.settings.key_prefix}:{{{m.id}}}:p:*",
                                              target_nodes=store.client.ALL_NODES)]
    assert len(keys) == 4
    store.client.delete(keys[1])
    with pytest.raises(StateCorruptError):
        store.get(m.id)
