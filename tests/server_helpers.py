"""Helpers for the server tests: a tiny fast model, its checkpoint, server processes, SSE parsing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from atlas.engine import Atlas, save_checkpoint

from .helpers import SHARED_DATA, tiny_atlas

#: A model that reads a few hundred thousand tokens a second on one CPU core: the server tests are
#: about the protocol, and a 5 MB document must go through in seconds.
FAST = dict(d_model=8, n_heads=1, n_layers=1, layers=["atlas"], omega_window=1, ns_steps=0, optimizer="gd",
            mem_depth=1, poly_degree=1, mem_expansion=1, chunk_size=4096, swa_window=4096)


def fast_atlas() -> Atlas:
    return tiny_atlas(torch.float32, **FAST)


def write_checkpoint(path: Path) -> Path:
    return save_checkpoint(fast_atlas().model, path)


def document(nbytes: int) -> bytes:
    """ASCII text of exactly ``nbytes``: tinyshakespeare repeated when present, else generated."""
    src = SHARED_DATA / "tinyshakespeare.txt"
    if src.exists():
        base = src.read_bytes()
    else:
        words = [b"time", b"memory", b"chunk", b"state", b"atlas", b"read", b"token", b"long", b"the"]
        base = b" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(200_000)) + b"\n"
    return (base * (nbytes // len(base) + 1))[:nbytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """Parsed ``data:`` payloads of a server-sent event stream (``[DONE]`` stays a string)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def parse_sse(text: str) -> list[dict | str]:
    return list(sse_events(text.splitlines()))


class ServerProcess:
    """``atlas serve`` in a child process on a free port, with its own ATLAS_* environment."""

    def __init__(self, workdir: Path, env: dict[str, str], host: str = "127.0.0.1", port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.host = host
        base = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
        self.env = {**base, "ATLAS_DATA_DIR": str(workdir / "data"), "ATLAS_TORCH_THREADS": "1",
                    "ATLAS_LOG_LEVEL": "info", **env}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"server-{self.port}.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atlas.server.cli", "serve", "--host", self.host,
             "--port", str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path (drain, close runtime and store)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no drain, no shutdown code at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


#: Exit statuses of a server that drained and stopped on SIGTERM.
GRACEFUL = (0, -15)


@contextmanager
def running_server(work: Path, env: dict[str, str], graceful: bool = True) -> Iterator[ServerProcess]:
    """A started `atlas serve` for the length of the block; stopped with SIGTERM (checked to drain
    cleanly when `graceful`), then killed for sure, with its embedded redis-server."""
    srv = ServerProcess(work, env)
    srv.start()
    try:
        yield srv
        status = srv.stop()
        if graceful:
            assert status in GRACEFUL, srv.log()
    finally:
        srv.kill()
        stop_embedded_redis(work / "data")


def stop_embedded_redis(data_dir: Path) -> None:
    """Shut down an embedded redis-server left behind by a SIGKILLed server (it runs detached)."""
    import redis

    sock = data_dir / "redis.sock"
    if not sock.exists():
        return
    try:
        redis.Redis(unix_socket_path=str(sock), socket_timeout=5).shutdown()
    except (redis.RedisError, OSError):
        pass


def kill_embedded_redis(data_dir: Path) -> int | None:
    """SIGKILL the embedded redis-server of ``data_dir`` (a crash: only its AOF survives)."""
    import redis

    sock = data_dir / "redis.sock"
    try:
        pid = int(redis.Redis(unix_socket_path=str(sock), socket_timeout=5).info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return pid
