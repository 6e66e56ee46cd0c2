"""The Python SDK and the `atlas` client commands against a real `atlas serve` process.

The SDK tests run with both ``AtlasClient`` and ``AsyncAtlasClient`` (on an event loop of the test's
own): the two are faces of one implementation and must behave alike, down to the sessions they make.

The resumed-ingest tests put a small TCP proxy between client and server that cuts the connection
once after N bytes of upload (or answers 503 to the first connections): the SDK must notice, ask the
session for ``bytes_committed`` and finish by itself, leaving the session an uninterrupted upload
would have made (same counters, same greedy continuation; the engine's streaming invariance).
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from atlas_client import (
    AsyncAtlasClient,
    AsyncTokenStream,
    AtlasClient,
    Busy,
    GenerateDone,
    NotFound,
    Token,
    Unauthorized,
    Unreachable,
)
from atlas_client import cli as client_cli
from atlas_client.cli import EXIT_NOT_FOUND, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE
from typer.testing import CliRunner

from atlas.server.cli import app as atlas_app
from bench.server_process import free_port

from .helpers import document
from .server_helpers import running_server

KEY = "k-acme"
ROMEO = "\nROMEO:"
CUT_DOC_BYTES = 1_200_000

Connect = Callable[..., AbstractContextManager[Any]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_checkpoint):
    work = tmp_path_factory.mktemp("clients")
    with running_server(work, {"ATLAS_MODEL": str(fast_checkpoint),
                               "ATLAS_API_KEYS": f"{KEY}:acme,k-globex:globex",
                               "ATLAS_PROGRESS_INTERVAL_S": "0"}) as srv:
        yield srv


@pytest.fixture
def sdk(server):
    """A sync client that sets up and checks what the client under test made."""
    with AtlasClient(server.url, KEY, backoff=0.02) as c:
        yield c


class LoopClient:
    """An AsyncAtlasClient called like an AtlasClient: each call runs to its end on this object's
    event loop, so that one test body checks both clients."""

    def __init__(self, client: AsyncAtlasClient):
        self.client, self.loop = client, asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            if isinstance(out, AsyncTokenStream):
                return LoopStream(out, self.loop)
            return self.loop.run_until_complete(out)

        return call

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


class LoopStream:
    """An AsyncTokenStream read like a TokenStream, one token per run of the loop."""

    def __init__(self, stream: AsyncTokenStream, loop: asyncio.AbstractEventLoop):
        self.stream, self.loop = stream, loop

    @property
    def done(self) -> GenerateDone | None:
        return self.stream.done

    def __iter__(self) -> Iterator[Token]:
        while True:
            try:
                yield self.loop.run_until_complete(self.stream.__anext__())
            except StopAsyncIteration:
                return

    def text(self) -> str:
        return self.loop.run_until_complete(self.stream.text())

    def close(self) -> None:
        self.loop.run_until_complete(self.stream.aclose())


@pytest.fixture(params=["sync", "async"])
def connect(request) -> Connect:
    """``with connect(url, key, **options) as c``: a client of the kind under test.
    ``fresh_connections``: a connection per request, so the proxy sees every request line."""

    @contextmanager
    def opened(url: str, key: str = KEY, *, fresh_connections: bool = False, **options: Any) -> Iterator[Any]:
        limits = httpx.Limits(max_keepalive_connections=0)
        if request.param == "sync":
            transport = httpx.HTTPTransport(limits=limits) if fresh_connections else None
            client: Any = AtlasClient(url, key, transport=transport, **options)
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits) if fresh_connections else None
            client = LoopClient(AsyncAtlasClient(url, key, transport=transport, **options))
        try:
            yield client
        finally:
            client.close()

    return opened


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


@pytest.fixture
def proxy(server) -> Iterator[Callable[..., Proxy]]:
    """Makes proxies to the server (``Proxy``'s options); all closed after the test."""
    made: list[Proxy] = []

    def make(**options: Any) -> Proxy:
        made.append(Proxy(server.port, **options))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def uncut(server) -> str:
    """A session of ``document(CUT_DOC_BYTES)`` sent in one go."""
    with AtlasClient(server.url, KEY) as c:
        return c.ingest(document(CUT_DOC_BYTES)).session_id


def greedy(c: AtlasClient, sid: str) -> list[int | None]:
    return [t.token for t in c.generate(sid, ROMEO, max_tokens=24, temperature=0)]


def assert_same_session(c: AtlasClient, a: str, b: str) -> None:
    sa, sb = c.get_session(a), c.get_session(b)
    assert (sa.tokens, sa.bytes_committed) == (sb.tokens, sb.bytes_committed)
    assert greedy(c, a) == greedy(c, b)


def test_sessions_and_errors(connect: Connect, server):
    with connect(server.url) as c:
        s = c.create_session()
        assert s.tokens == 0 and s.bytes_committed == 0
        assert [x.id for x in c.list_sessions()].count(s.id) == 1
        assert c.get_session(s.id) == s
        f = c.fork(s)
        assert f.forked_from == s.id and f.id != s.id
        c.delete_session(f.id)
        with pytest.raises(NotFound) as e:
            c.get_session(f.id)
        assert e.value.status == 404 and e.value.code == "session_not_found"
        with pytest.raises(NotFound):
            list(c.generate(f.id, ROMEO, max_tokens=1))       # a stream's request leaves at the first read
    with connect(server.url, "wrong") as bad, pytest.raises(Unauthorized):
        bad.list_sessions()
    with connect(server.url, "k-globex") as other, pytest.raises(NotFound):  # another tenant's session
        other.get_session(s.id)
    with connect(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as gone, \
            pytest.raises(Unreachable):
        gone.list_sessions()


@pytest.mark.parametrize("kind", ["file", "iterator"])
def test_ingest_resumes_after_the_connection_is_cut(connect: Connect, proxy, sdk, uncut, tmp_path, kind):
    doc = document(CUT_DOC_BYTES)
    path = tmp_path / "doc.txt"
    path.write_bytes(doc)
    source = path if kind == "file" else (doc[i:i + 50_000] for i in range(0, len(doc), 50_000))
    cutter = proxy(cut_after=500_000)
    seen = []
    with connect(cutter.url, backoff=0.02) as c:
        last = c.ingest(source, on_progress=seen.append, piece_bytes=64 << 10, request_bytes=4 << 20)
    assert cutter.cuts == 1 and last.resumes >= 1 and last.done
    assert last.bytes_committed == len(doc)
    assert seen[-1] == last and max(p.bytes_sent for p in seen) >= len(doc)
    assert_same_session(sdk, uncut, last.session_id)


def test_ingest_in_several_requests_and_appends_equal_one(connect: Connect, server, sdk):
    doc = document(300_000)
    one = sdk.ingest(doc).session_id
    with connect(server.url) as c:
        pieces = c.ingest(doc, request_bytes=70_000, piece_bytes=16_000)
        assert pieces.bytes_committed == len(doc)
        sid = c.create_session().id
        c.ingest(doc[:123_457], sid)
        c.ingest(doc[123_457:], sid, start=None)              # append after what it has
        c.ingest(doc, sid)                                    # the whole document again: nothing new
    assert_same_session(sdk, one, pieces.session_id)
    assert_same_session(sdk, one, sid)


def test_busy_answers_are_retried_with_backoff(connect: Connect, proxy):
    busy = proxy(fail_first=2)
    with connect(busy.url, backoff=0.01, fresh_connections=True) as c:
        sid = c.create_session().id                           # two 503s first, then through
        assert busy.failed == 2
        busy.fail_first, busy.fail_path = 3, b"/ingest"
        last = c.ingest(document(50_000), sid)                # the ingest itself meets 503 once
        assert last.bytes_committed == 50_000 and last.resumes == 1
    busy.fail_first, busy.fail_path = busy.failed + 5, b""
    with connect(busy.url, retries=1, backoff=0.01) as c, pytest.raises(Busy):
        c.list_sessions()


def test_generate_and_complete_stream_tokens(connect: Connect, server, sdk):
    sid = sdk.ingest(document(100_000)).session_id
    with connect(server.url) as c:
        stream = c.generate(sid, ROMEO, max_tokens=16, temperature=0)
        tokens = list(stream)
        assert len(tokens) == 16 and all(isinstance(t.token, int) for t in tokens)
        assert stream.done.finish_reason == "length" and stream.done.usage.completion_tokens == 16
        text = "".join(t.text for t in tokens)
        assert text == sdk.generate(sid, ROMEO, max_tokens=16, temperature=0).text()
        comp = c.complete(ROMEO, sid, max_tokens=16, temperature=0)
        assert comp.text() == text and comp.done.usage.completion_tokens == 16
        early = c.generate(sid, ROMEO, max_tokens=16, temperature=0)
        assert next(iter(early)) == tokens[0]
        early.close()                                         # drops the connection; the client goes on
        before = c.get_session(sid)
        assert before.bytes_committed == 100_000              # generations ran on forks
        committed = c.generate(sid, "\nQ:", max_tokens=4, temperature=0, commit=True)
        list(committed)
        assert committed.done.session is not None and committed.done.session.tokens > before.tokens


def test_cli_commands_and_exit_codes(server, tmp_path, sdk):
    runner = CliRunner()
    env = {"ATLAS_URL": server.url, "ATLAS_API_KEY": KEY, "ATLAS_RETRIES": "0"}
    path = tmp_path / "book.txt"
    path.write_bytes(document(150_000))
    r = runner.invoke(atlas_app, ["ingest", str(path)], env=env)
    assert r.exit_code == 0, r.output
    sid = r.stdout.strip()
    assert sdk.get_session(sid).bytes_committed == 150_000 and "150,000 bytes committed" in r.stderr
    answer = sdk.generate(sid, ROMEO, max_tokens=12, temperature=0).text() + "\n"
    for prompt, stdin in ((ROMEO, None), ("-", ROMEO), (None, ROMEO)):  # the prompt, or stdin
        args = ["ask", sid, *([prompt] if prompt else []), "--max-tokens", "12", "--temperature", "0"]
        r = runner.invoke(atlas_app, args, env=env, input=stdin)
        assert r.exit_code == 0 and r.stdout == answer, (prompt, r.output)
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


def test_ask_needs_a_prompt_when_stdin_is_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("not read"))
    with pytest.raises(typer.BadParameter):
        client_cli._prompt(None)
    assert client_cli._prompt("-") == "not read"


def test_client_command_runs_without_the_server_package(server, tmp_path, sdk):
    """``python -m atlas_client`` is the CLI of the client distribution alone: no torch, no FastAPI;
    a prompt piped in from printf reaches the server as the newlines it means."""
    code = ("import sys, atlas_client.cli; bad = {'torch', 'fastapi', 'atlas'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    path = tmp_path / "small.txt"
    path.write_bytes(document(20_000))
    env = {"PATH": "/usr/bin:/bin", "ATLAS_URL": server.url, "ATLAS_API_KEY": KEY, "PY": sys.executable}
    out = subprocess.run([sys.executable, "-m", "atlas_client", "ingest", str(path), "-q"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    sid, = out.stdout.split()
    shell = "printf '\\nQ: who?\\nA:' | \"$PY\" -m atlas_client ask \"$SID\" - -n 8 -t 0"
    out = subprocess.run(["bash", "-c", shell], env={**env, "SID": sid}, capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout == sdk.generate(sid, "\nQ: who?\nA:", max_tokens=8, temperature=0).text() + "\n"


def test_an_iterator_source_keeps_what_progress_events_report_until_its_request_ends():
    """Progress events are no acknowledgements (docs/chaos.md): a store outage sends the next
    request back to the last checkpoint, so an iterator's replay buffer must still hold it."""
    from atlas_client._core import Upload
    from atlas_client._source import Source

    doc = document(300_000)
    source = Source((doc[i:i + 10_000] for i in range(0, len(doc), 10_000)), piece_bytes=10_000)
    upload = Upload("s", source, 0, 0, 1 << 20, None)
    body = b"".join(upload.body())
    assert body == doc
    upload.event({"bytes_committed": 250_000, "tokens": 250_000, "tokens_per_s": 1.0})
    upload.resume(65_536)  # the outage: the session is back at its checkpoint
    assert b"".join(source.pieces(65_536)) == doc[65_536:]
    upload.finished(type("Done", (), {"bytes_committed": len(doc)})())  # the request's end confirms
    assert not source._buf


def test_a_failed_append_resumes_where_its_file_begins(fast_checkpoint, tmp_path):
    """`atlas ingest FILE --session S --append` that fails prints how to resume: with --start, the
    offset where FILE begins in the document, so that no byte of FILE is skipped or sent twice."""
    runner = CliRunner()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(document(30_000))
    second.write_bytes(document(250_000)[::-1])
    settings = {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": f"{KEY}:acme",
                "ATLAS_MAX_BODY_BYTES": "100000"}
    with running_server(tmp_path / "srv", settings) as srv:
        env = {"ATLAS_URL": srv.url, "ATLAS_API_KEY": KEY, "ATLAS_RETRIES": "0"}
        r = runner.invoke(atlas_app, ["ingest", str(first), "-q"], env=env)
        sid = r.stdout.strip()
        args = ["ingest", str(second), "--session", sid, "--append", "-q"]
        for _ in range(4):  # each request may carry 100,000 bytes: it fails, then resumes as told
            r = runner.invoke(atlas_app, args, env=env)
            if r.exit_code == 0:
                break
            assert "error 413 body_too_large" in r.stderr  # the stream's error event has its status
            hint = r.stderr.split("resume with: ")[1].splitlines()[0].split()
            assert hint[-2:] == ["--start", "30000"], r.stderr
            args = [*hint[1:], "-q"]
        assert r.exit_code == 0, r.output
        with AtlasClient(srv.url, KEY) as c:
            meta = c.get_session(sid)
    assert meta.bytes_committed == meta.tokens == 280_000
