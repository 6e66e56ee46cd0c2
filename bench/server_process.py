"""``atlas serve`` as a child process on a free loopback port: started, waited for until ``/ready``,
stopped (SIGTERM, then SIGKILL if it does not drain) or killed outright.

The benchmarks start their server with it, and so do the tests (as ``bench.server_process``: the
test run has the repository root on its import path, a benchmark script its own folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

#: Exit statuses of a server that drained and stopped on SIGTERM (uvicorn re-raises the signal once
#: it has shut down).
GRACEFUL = (0, -signal.SIGTERM)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``atlas serve`` in ``workdir`` with only the given ATLAS_* settings (the parent's are dropped).

    The data directory defaults to ``workdir/data``; ``threads`` is ATLAS_TORCH_THREADS, one unless
    told otherwise because several servers often share the machine (None: the server's own choice).
    ``args`` are more options of ``atlas serve`` (``["--dtype", "bfloat16"]``).
    The log of every start goes to ``workdir/server-<port>.log``.
    """

    def __init__(self, workdir: Path, settings: Mapping[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, threads: int | None = 1, args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
        defaults = {"ATLAS_DATA_DIR": str(workdir / "data")}
        if threads is not None:
            defaults["ATLAS_TORCH_THREADS"] = str(threads)
        self.env = {**inherited, **defaults, **(settings or {})}
        self.args = list(args)
        self.log_path = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Start the process without waiting for it (several servers can then load at once)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "atlas.server.cli", "serve", "--host", self.host,
               "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until ``/ready`` answers 200; RuntimeError with the log if the server exits or is late."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log(4000)}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s:\n{self.log(4000)}")

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def log(self, tail: int | None = None) -> str:
        """The server's output over all its starts (the last ``tail`` characters)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, the graceful path (drain, close runtime and store); SIGKILL if it is not done in
        ``timeout_s``. The exit status (in GRACEFUL after a clean drain); None if it never ran."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no shutdown code at all (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
