"""Servers for the tests: ``atlas serve`` processes that are always stopped, their embedded
redis-server, and the parsing of server-sent events."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.server_process import GRACEFUL, ServerProcess


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """Parsed ``data:`` payloads of a server-sent event stream (``[DONE]`` stays a string)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def parse_sse(text: str) -> list[dict | str]:
    return list(sse_events(text.splitlines()))


@contextmanager
def running_server(work: Path, env: dict[str, str], graceful: bool = True,
                   args: Sequence[str] = (), timeout_s: float = 60.0) -> Iterator[ServerProcess]:
    """A started `atlas serve` (with more options `args`) for the length of the block; stopped with
    SIGTERM (checked to drain cleanly when `graceful`), then killed for sure, with its embedded
    redis-server."""
    srv = ServerProcess(work, env, args=args).start(timeout_s)
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
    sock = data_dir / "redis.sock"
    if not sock.exists():
        return
    try:
        redis.Redis(unix_socket_path=str(sock), socket_timeout=5).shutdown()
    except (redis.RedisError, OSError):
        pass


def kill_embedded_redis(data_dir: Path) -> int | None:
    """SIGKILL the embedded redis-server of ``data_dir`` (a crash: only its AOF survives)."""
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
