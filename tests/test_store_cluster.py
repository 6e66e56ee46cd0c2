"""The same store code on a local 3-master Redis Cluster (skipped without redis-cli)."""

from __future__ import annotations

import os

import pytest

from atlas.engine.store import LeaseConflictError, StateCorruptError

PART = 64 << 10


def test_cluster_round_trip_many_slots(cluster_store):
    sids = []
    for n in [0, 1, PART, 3 * PART + 1, 20 * PART + 5]:
        data = os.urandom(n)
        m = cluster_store.create("acme", fingerprint="fp")
        cluster_store.put(m.id, data, fingerprint="fp", tokens=n)
        assert cluster_store.get(m.id, expected_fingerprint="fp")[0] == data
        sids.append(m.id)
    # each session's keys share one slot (its hash tag); sessions spread over the masters (with
    # 20 random ids, all on one of three masters has odds of 3 * 3**-20)
    rc = cluster_store.client
    prefix = cluster_store.settings.key_prefix
    for sid in sids:
        assert len({rc.keyslot(f"{prefix}:{{{sid}}}:{k}") for k in ("s", "lease", "fence")}) == 1
    spread = [cluster_store.create("spread").id for _ in range(15)] + sids
    assert len({rc.get_node_from_key(f"{prefix}:{{{sid}}}:s").port for sid in spread}) >= 2
    assert sorted(m.id for m in cluster_store.list("acme")) == sorted(sids)
    cluster_store.delete(sids[0])
    assert sorted(m.id for m in cluster_store.list("acme")) == sorted(sids[1:])


def test_cluster_lease_and_integrity(cluster_store):
    m = cluster_store.create("acme")
    with cluster_store.lease(m.id, "a") as lease:
        with pytest.raises(LeaseConflictError):
            cluster_store.lease(m.id, "b")
        cluster_store.put(m.id, os.urandom(4 * PART), fingerprint="f", fence=lease.fence)
    meta = cluster_store.meta(m.id)
    assert meta.generation == 1
    client = cluster_store.client
    keys = list(client.scan_iter(f"{cluster_store.settings.key_prefix}:{{{m.id}}}:p:*",
                                 target_nodes=client.ALL_NODES))
    assert len(keys) == 4
    client.delete(keys[1])
    with pytest.raises(StateCorruptError):
        cluster_store.get(m.id)
