"""Real redis-server processes for the store tests (one server, or a cluster of them), always
stopped, and stores on them."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from atlas.engine.store import RedisStore, StoreSettings, connect
from bench.server_process import free_port


def redis_server_binary() -> str:
    """``$ATLAS_TEST_REDIS_SERVER`` or the first ``redis-server`` on PATH (test skipped if none)."""
    exe = os.environ.get("ATLAS_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not exe:
        pytest.skip("redis-server is not installed")
    return exe


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free TCP port whose cluster bus port (+10000) is free too, so at most 55535."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server child process on 127.0.0.1:<free port>, data in ``workdir``."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = port or (free_cluster_port() if "--cluster-enabled" in args else free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
               "--logfile", str(self.workdir / "redis.log"), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log_tail()}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self) -> str:
        log = self.workdir / "redis.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@contextmanager
def redis_server(workdir: Path, *args: str) -> Iterator[RedisServer]:
    server = RedisServer(workdir, *args).start()
    try:
        yield server
    finally:
        server.kill()


def make_store(url: str, prefix: str, *, cluster: bool = False, **settings: object) -> RedisStore:
    """A store on ``url`` with a small part size, its own key prefix, and fail-fast sockets."""
    s = StoreSettings(redis_url=url, redis_cluster=cluster, key_prefix=prefix,
                      part_bytes=int(settings.pop("part_bytes", 64 << 10)), **settings)  # type: ignore[arg-type]
    return RedisStore(connect(url, cluster=cluster, timeout_s=10), s)


def start_cluster(root: Path, masters: int = 3) -> list[RedisServer]:
    """A Redis Cluster of ``masters`` nodes under ``root``, converged (skipped without redis-cli)."""
    cli = os.environ.get("ATLAS_TEST_REDIS_CLI") or shutil.which("redis-cli")
    if not cli:
        pytest.skip("redis-cli is not installed")
    nodes = [RedisServer(root / f"n{i}", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                         "--appendonly", "no") for i in range(masters)]
    try:
        for n in nodes:
            n.start()
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        for n in nodes:
            client = redis.Redis(port=n.port)
            try:
                while client.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not converge")
                    time.sleep(0.05)
            finally:
                client.close()
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    return nodes
