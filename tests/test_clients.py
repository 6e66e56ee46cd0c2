"""The Python SDK and the `atlas` client commands against a real `atlas serve` process.

The resumed-ingest tests put a small TCP proxy between client and server that cuts the connection
once after N bytes of upload (or answers 503 to the first connections): the SDK must notice, ask the
session for ``bytes_committed`` and finish by itself, leaving the session an uninterrupted upload
would have made (same counters, same greedy continuation; the engine's streaming invariance).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from atlas_client import AsyncAtlasClient, AtlasClient, Busy, NotFound, Unauthorized, Unreachable
from atlas_client.cli import EXIT_NOT_FOUND, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE
from typer.testing import CliRunner

from atlas.server.cli import app as atlas_app

from .server_helpers import (
    document,
    free_port,
    running_server,
    write_checkpoint,
)

KEY = "k-acme"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fast-atlas")
    work = tmp_path_factory.mktemp("clients")
    with running_server(work, {"ATLAS_MODEL": str(ckpt), "ATLAS_API_KEYS": f"{KEY}:acme,k-globex:globex",
                               "ATLAS_PROGRESS_INTERVAL_S": "0"}) as srv:
        yield srv


@pytest.fixture
def sdk(server):
    with AtlasClient(server.url, KEY, backoff=0.02) as c:
        yield c


class Proxy:
    """Forwards 127.0.0.1:port to the server. ``cut_after``: the first connection whose upload passes
    that many bytes is cut (both ways, at once), once. ``fail_first``: that many connections whose
    request line contains ``fail_path`` get a 503 ``queue_full`` with ``Retry-After: 0`` instead of
    reaching the server."""

    def __init__(self, target: int, cut_after: int | None = None, fail_first: int = 0,
                 fail_path: bytes = b""):
        self.target, self.cut_after = target, cut_after
        self.fail_first, self.fail_path = fail_first, fail_path
        self.cuts = self.failed = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        line = conn.recv(4096, socket.MSG_PEEK).split(b"\r\n", 1)[0]
        with self.lock:
            fail = self.failed < self.fail_first and self.fail_path in line
            self.failed += fail
        if fail:
            head = b""
            while b"\r\n\r\n" not in head and (piece := conn.recv(65536)):
                head += piece
            body = b'{"error":{"code":"queue_full","message":"busy (proxy)"}}'
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.target))

        def cut() -> None:
            for s in (conn, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        def pump(src: socket.socket, dst: socket.socket, count: bool) -> None:
            total = 0
            try:
                while piece := src.recv(65536):
                    total += len(piece)
                    if count and self.cut_after is not None and total > self.cut_after:
                        with self.lock:
                            first = self.cuts == 0
                            self.cuts += first
                        if first:
                            dst.sendall(piece[:len(piece) - (total - self.cut_after)])
                            cut()
                            return
                    dst.sendall(piece)
            except OSError:
                pass
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=pump, args=(up, conn, False), daemon=True).start()
        pump(conn, up, True)


def greedy(c: AtlasClient, sid: str) -> list[int | None]:
    return [t.token for t in c.generate(sid, "\nROMEO:", max_tokens=24, temperature=0)]


def assert_same_session(c: AtlasClient, a: str, b: str) -> None:
    sa, sb = c.get_session(a), c.get_session(b)
    assert (sa.tokens, sa.bytes_committed) == (sb.tokens, sb.bytes_committed)
    assert greedy(c, a) == greedy(c, b)


def test_sessions_crud_and_errors(sdk, server):
    s = sdk.create_session()
    assert s.tokens == 0 and s.bytes_committed == 0
    assert s.id in [x.id for x in sdk.list_sessions()]
    assert sdk.get_session(s.id) == s
    f = sdk.fork(s)
    assert f.forked_from == s.id and f.id != s.id
    sdk.delete_session(f.id)
    with pytest.raises(NotFound) as e:
        sdk.get_session(f.id)
    assert e.value.status == 404 and e.value.code == "session_not_found"
    with pytest.raises(Unauthorized), AtlasClient(server.url, "wrong") as bad:
        bad.list_sessions()
    with pytest.raises(NotFound), AtlasClient(server.url, "k-globex") as other:  # another tenant's session
        other.get_session(s.id)
    with pytest.raises(Unreachable), AtlasClient(f"http://127.0.0.1:{free_port()}", KEY, retries=1,
                                                 backoff=0.01) as gone:
        gone.list_sessions()


@pytest.mark.parametrize("kind", ["file", "iterator"])
def test_ingest_resumes_after_the_connection_is_cut(sdk, server, tmp_path, kind):
    doc = document(1_200_000)
    ref = sdk.ingest(doc).session_id
    proxy = Proxy(server.port, cut_after=500_000)
    try:
        path = tmp_path / "doc.txt"
        path.write_bytes(doc)
        source = path if kind == "file" else (doc[i:i + 50_000] for i in range(0, len(doc), 50_000))
        seen = []
        with AtlasClient(proxy.url, KEY, backoff=0.02) as c:
            last = c.ingest(source, on_progress=seen.append, piece_bytes=64 << 10, request_bytes=4 << 20)
        assert proxy.cuts == 1 and last.resumes >= 1 and last.done
        assert last.bytes_committed == len(doc)
        assert seen[-1] == last and max(p.bytes_sent for p in seen) >= len(doc)
    finally:
        proxy.close()
    assert_same_session(sdk, ref, last.session_id)


def test_ingest_in_several_requests_and_appends_equal_one(sdk):
    doc = document(300_000)
    one = sdk.ingest(doc).session_id
    pieces = sdk.ingest(doc, request_bytes=70_000, piece_bytes=16_000)
    assert pieces.bytes_committed == len(doc)
    sid = sdk.create_session().id
    sdk.ingest(doc[:123_457], sid)
    sdk.ingest(doc[123_457:], sid, start=None)                # append after what it has
    sdk.ingest(doc, sid)                                      # the whole document again: nothing new
    assert_same_session(sdk, one, pieces.session_id)
    assert_same_session(sdk, one, sid)


def test_busy_answers_are_retried_with_backoff(sdk, server):
    proxy = Proxy(server.port, fail_first=2)
    fresh = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))  # a connection per request
    try:
        with AtlasClient(proxy.url, KEY, backoff=0.01, transport=fresh) as c:
            sid = c.create_session().id                       # two 503s first, then through
            assert proxy.failed == 2
            proxy.fail_first, proxy.fail_path = 3, b"/ingest"
            last = c.ingest(document(50_000), sid)            # the ingest itself meets 503 once
            assert last.bytes_committed == 50_000 and last.resumes == 1
        with pytest.raises(Busy), AtlasClient(proxy.url, KEY, retries=1, backoff=0.01) as c:
            proxy.fail_first, proxy.fail_path = proxy.failed + 5, b""
            c.list_sessions()
    finally:
        proxy.close()


def test_generate_and_complete_stream_tokens(sdk):
    sid = sdk.ingest(document(100_000)).session_id
    stream = sdk.generate(sid, "\nROMEO:", max_tokens=16, temperature=0)
    tokens = list(stream)
    assert len(tokens) == 16 and all(isinstance(t.token, int) for t in tokens)
    assert stream.done and stream.done.finish_reason == "length" and stream.done.usage.completion_tokens == 16
    text = "".join(t.text for t in tokens)
    comp = sdk.complete("\nROMEO:", sid, max_tokens=16, temperature=0)
    assert comp.text() == text and comp.done.usage.completion_tokens == 16
    assert sdk.get_session(sid).tokens == 100_000 or sdk.get_session(sid).bytes_committed == 100_000
    committed = sdk.generate(sid, "\nQ:", max_tokens=4, temperature=0, commit=True)
    list(committed)
    assert committed.done.session is not None and committed.done.session.tokens > 0


def test_async_client_matches_sync(sdk, server):
    doc = document(200_000)
    ref = sdk.ingest(doc).session_id

    async def run() -> tuple[str, str]:
        async with AsyncAtlasClient(server.url, KEY) as c:
            last = await c.ingest(doc, request_bytes=64_000)
            assert last.bytes_committed == len(doc)
            text = await c.generate(last.session_id, "\nROMEO:", max_tokens=12, temperature=0).text()
            assert [s.id for s in await c.list_sessions()].count(last.session_id) == 1
            fork = await c.fork(last.session_id)
            await c.delete_session(fork.id)
            return last.session_id, text

    sid, text = asyncio.run(run())
    assert sdk.generate(ref, "\nROMEO:", max_tokens=12, temperature=0).text() == text
    assert_same_session(sdk, ref, sid)


def test_cli_commands_and_exit_codes(server, tmp_path, sdk):
    runner = CliRunner()
    env = {"ATLAS_URL": server.url, "ATLAS_API_KEY": KEY, "ATLAS_RETRIES": "0"}
    path = tmp_path / "book.txt"
    path.write_bytes(document(150_000))
    r = runner.invoke(atlas_app, ["ingest", str(path)], env=env)
    assert r.exit_code == 0, r.output
    sid = r.stdout.strip()
    assert sdk.get_session(sid).bytes_committed == 150_000 and "150,000 bytes committed" in r.stderr
    ask = ["ask", sid, "\nROMEO:", "--max-tokens", "12", "--temperature", "0"]
    r = runner.invoke(atlas_app, ask, env=env)
    assert r.exit_code == 0 and r.stdout == sdk.generate(sid, "\nROMEO:", max_tokens=12,
                                                          temperature=0).text() + "\n"
    r = runner.invoke(atlas_app, ["fork", sid], env=env)
    fork = r.stdout.strip()
    assert r.exit_code == 0 and sdk.get_session(fork).forked_from == sid
    r = runner.invoke(atlas_app, ["sessions"], env=env)
    assert r.exit_code == 0 and sid in r.stdout and fork in r.stdout
    r = runner.invoke(atlas_app, ["sessions", "rm", fork], env=env)
    assert r.exit_code == 0
    r = runner.invoke(atlas_app, ["sessions", "rm", fork], env=env)
    assert r.exit_code == EXIT_NOT_FOUND and "session_not_found" in r.stderr
    r = runner.invoke(atlas_app, ["sessions", "--api-key", "wrong"], env=env)
    assert r.exit_code == EXIT_UNAUTHORIZED and "unauthorized" in r.stderr
    r = runner.invoke(atlas_app, ["sessions", "--url", f"http://127.0.0.1:{free_port()}"], env=env)
    assert r.exit_code == EXIT_UNREACHABLE


def test_client_command_runs_without_the_server_package(server, tmp_path):
    """``python -m atlas_client`` is the CLI of the client distribution alone: no torch, no FastAPI."""
    code = ("import sys, atlas_client.cli; bad = {'torch', 'fastapi', 'atlas'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    path = tmp_path / "small.txt"
    path.write_bytes(document(20_000))
    env = {"PATH": "/usr/bin:/bin", "ATLAS_URL": server.url, "ATLAS_API_KEY": KEY}
    out = subprocess.run([sys.executable, "-m", "atlas_client", "ingest", str(path), "-q"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 1
