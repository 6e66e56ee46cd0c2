"""redis-server SIGKILLed in the middle of a put, then restarted from its AOF: the previous
generation loads intact, and no half-written state is ever served."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis

from atlas.engine.store import StoreUnavailableError

from .store_helpers import RedisServer, make_store

PART = 64 << 10


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    yield s
    s.kill()


def test_sigkill_during_put_keeps_previous_generation(server):
    store = make_store(server.url, "crash", part_bytes=PART, socket_timeout_s=5)
    sid = store.create("acme", fingerprint="fp").id
    old = os.urandom(5 * PART + 123)
    store.put(sid, old, fingerprint="fp", tokens=1)
    assert store.generation(sid) == 1
    new = os.urandom(24 << 20)  # 384 parts: the kill lands while they are being written
    watcher = redis.Redis(port=server.port)
    killed = threading.Event()

    before = watcher.dbsize()

    def kill_once_parts_arrive() -> None:
        deadline = time.monotonic() + 20
        while watcher.dbsize() < before + 8 and time.monotonic() < deadline:
            time.sleep(0.0005)
        server.kill()
        killed.set()

    killer = threading.Thread(target=kill_once_parts_arrive)
    killer.start()
    with pytest.raises(StoreUnavailableError):
        store.put(sid, new, fingerprint="fp", tokens=2)
    killer.join()
    assert killed.is_set()
    watcher.close()
    store.close()

    server.start()  # same port, same dir: replays the AOF
    store = make_store(server.url, "crash", part_bytes=PART)
    try:
        data, meta = store.get(sid, expected_fingerprint="fp")
        assert data == old and meta.generation == 1 and meta.tokens == 1
        # the parts the dead put did write are pending: they expire, nobody can load them
        raw = redis.Redis(port=server.port)
        m = json.loads(raw.hget(f"crash:{{{sid}}}:s", "manifest"))
        orphans = [k for k in raw.scan_iter(f"crash:{{{sid}}}:p:*") if m["wid"] not in k.decode()]
        assert orphans and all(raw.pttl(k) > 0 for k in orphans)
        raw.close()
        # and the session goes on: the next put commits generation 2
        store.put(sid, new[:PART * 3], fingerprint="fp", tokens=2)
        assert store.get(sid)[0] == new[:PART * 3] and store.generation(sid) == 2
    finally:
        store.close()
