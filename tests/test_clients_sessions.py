"""Sessions that travel, from the client side: the SDK's ``export_state`` / ``import_state``,
``update_session`` and the paged ``list_sessions``, and the ``atlas sessions`` commands, against a
real ``atlas serve`` process.

The SDK tests run with both ``AtlasClient`` and ``AsyncAtlasClient`` (as in test_clients.py): one
implementation under two faces, which must make the same sessions. A session exported and imported
again must be the same session: counters, labels and the same greedy continuation.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from atlas_client import KEEP, AsyncAtlasClient, AtlasClient, AtlasError, Busy, Conflict, NotFound, Session
from atlas_client.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_USAGE
from typer.testing import CliRunner

from atlas.server.cli import app as atlas_app

from .helpers import document
from .server_helpers import running_server
from .test_clients import LoopClient

KEY = "k-acme"
ROMEO = "\nROMEO:"
DOC = document(60_000)

Connect = Callable[..., AbstractContextManager[Any]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_checkpoint):
    work = tmp_path_factory.mktemp("clients-sessions")
    with running_server(work, {"ATLAS_MODEL": str(fast_checkpoint),
                               "ATLAS_API_KEYS": f"{KEY}:acme,k-globex:globex,k-broke:broke",
                               "ATLAS_PROGRESS_INTERVAL_S": "0"}) as srv:
        yield srv


@pytest.fixture
def sdk(server) -> Iterator[AtlasClient]:
    """A sync client that sets up and checks what the client under test made."""
    with AtlasClient(server.url, KEY, backoff=0.02) as c:
        yield c


class PagedLoopClient(LoopClient):
    """test_clients' LoopClient, whose async generators (``iter_sessions``) are read as iterators."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if name != "iter_sessions":
            return super().__getattr__(name)

        def items(*args: Any, **kwargs: Any) -> Iterator[Any]:
            agen: AsyncIterator[Any] = method(*args, **kwargs)
            while True:
                try:
                    yield self.loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return

        return items


@pytest.fixture(params=["sync", "async"])
def connect(request) -> Connect:
    @contextmanager
    def opened(url: str, key: str = KEY, **options: Any) -> Iterator[Any]:
        client: Any = (AtlasClient(url, key, **options) if request.param == "sync"
                       else PagedLoopClient(AsyncAtlasClient(url, key, **options)))
        try:
            yield client
        finally:
            client.close()

    return opened


@pytest.fixture(scope="module")
def labelled(server) -> str:
    """A session of ``DOC`` with a name and metadata, the one the tests export."""
    with AtlasClient(server.url, KEY) as c:
        sid = c.ingest(DOC).session_id
        c.update_session(sid, name="the book", metadata={"project": "atlas", "n": 3, "ok": True, "x": None})
        return sid


def greedy(c: AtlasClient, sid: str) -> list[int | None]:
    return [t.token for t in c.generate(sid, ROMEO, max_tokens=12, temperature=0)]


def same(a: Session, b: Session) -> bool:
    keys = ("tokens", "bytes_committed", "state_bytes", "name", "metadata")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


class Pipe(io.RawIOBase):
    """A binary file that can only be read or written in order (stdin, a socket): no seek, no tell."""

    def __init__(self, data: bytes = b""):
        self.data, self.out = io.BytesIO(data), bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self.data.readinto(b)

    def write(self, b: Any) -> int:
        self.out += b
        return len(b)


# -- SDK ---------------------------------------------------------------------------------------------

def test_export_import_round_trip(connect: Connect, server, sdk, labelled, tmp_path):
    original = sdk.get_session(labelled)
    with connect(server.url) as c:
        data = c.export_state(labelled)
        path = tmp_path / "book.atlas-session"
        assert c.export_state(original, path) == len(data) and path.read_bytes() == data
        assert not path.with_name(path.name + ".part").exists()
        pipe = Pipe()
        assert c.export_state(labelled, pipe) == len(data) and bytes(pipe.out) == data
        from_path = c.import_state(path, ttl_s=600)
        from_bytes = c.import_state(data)
        from_pipe = c.import_state(Pipe(data))           # no length known: sent chunked
    for s in (from_path, from_bytes, from_pipe):
        assert s.id != labelled and same(s, original), s
        assert s.metadata == {"project": "atlas", "n": 3, "ok": True, "x": None}
    assert from_path.ttl_s == 600 and from_bytes.ttl_s is None
    assert greedy(sdk, from_bytes.id) == greedy(sdk, labelled)
    # the copy goes on like the original: the rest of a longer document gives the same session
    longer = DOC + document(90_000)[60_000:]
    a, b = (sdk.ingest(longer, sdk.fork(sid)) for sid in (labelled, from_path.id))  # forks: `labelled` stays
    assert (a.bytes_committed, a.tokens) == (b.bytes_committed, b.tokens) == (90_000, 90_000)
    assert greedy(sdk, a.session_id) == greedy(sdk, b.session_id)


def test_session_files_travel_between_tenants_but_sessions_do_not(connect: Connect, server, sdk, labelled):
    data = sdk.export_state(labelled)
    with connect(server.url, "k-globex") as other:
        with pytest.raises(NotFound):
            other.export_state(labelled)
        mine = other.import_state(data)
        assert same(mine, sdk.get_session(labelled)) and mine.id in {s.id for s in other.list_sessions()}
    with pytest.raises(NotFound):
        sdk.get_session(mine.id)


def test_damaged_and_missing_files_are_refused(connect: Connect, server, labelled, tmp_path):
    with connect(server.url, backoff=0.01) as c:
        data = c.export_state(labelled)
        altered = bytearray(data)
        altered[-100] ^= 0xFF
        for bad in (data[:-10], bytes(altered), b"not a session file", b""):
            with pytest.raises(AtlasError) as e:
                c.import_state(bad)
            assert e.value.status == 400 and e.value.code == "invalid_session_file" and e.value.message
        target = tmp_path / "missing.atlas-session"
        with pytest.raises(NotFound):
            c.export_state("no-such-session", target)
        assert list(tmp_path.iterdir()) == []                # no file, no leftover .part
        with pytest.raises(FileNotFoundError):
            c.import_state(tmp_path / "nope.atlas-session")


def test_update_session_sets_and_clears(connect: Connect, server):
    with connect(server.url) as c:
        s = c.create_session()
        assert (s.name, s.metadata, s.ttl_s, s.sliding_ttl, s.broken) == (None, {}, None, False, None)
        s = c.update_session(s, name="notes", metadata={"a": "1", "b": 2.5}, ttl_s=3600, sliding_ttl=True)
        assert (s.name, s.metadata, s.ttl_s, s.sliding_ttl) == ("notes", {"a": "1", "b": 2.5}, 3600, True)
        s = c.update_session(s.id, name="renamed")          # the rest stays
        assert (s.name, s.metadata, s.ttl_s, s.sliding_ttl) == ("renamed", {"a": "1", "b": 2.5}, 3600, True)
        s = c.update_session(s, metadata={"c": False})       # replaced whole
        assert s.metadata == {"c": False} and s.name == "renamed"
        s = c.update_session(s, name=None, ttl_s=None, sliding_ttl=False)
        assert (s.name, s.metadata, s.ttl_s, s.sliding_ttl) == (None, {"c": False}, None, False)
        s = c.update_session(s, metadata=None, name=KEEP)
        assert s.metadata == {} and c.get_session(s.id) == s
        unchanged = c.update_session(s)                      # nothing asked, nothing changed
        assert unchanged.model_dump(exclude={"updated"}) == s.model_dump(exclude={"updated"})
        with pytest.raises(AtlasError) as e:
            c.update_session(s, name="x" * 1000)
        assert e.value.status == 422
        with pytest.raises(NotFound):
            c.update_session("no-such-session", name="x")


def test_list_sessions_across_pages_and_filters(connect: Connect, server):
    run = uuid.uuid4().hex                                   # this run's sessions, whatever else exists
    with connect(server.url) as c:
        made = []
        for i in range(7):
            s = c.create_session()
            labels = {"run": run, "i": i, "odd": i % 2 == 1}
            made.append(c.update_session(s, name=f"{run}-{i % 2}", metadata=labels))
        ids = [s.id for s in made]
        assert [s.id for s in c.list_sessions(metadata={"run": run}, limit=2)] == ids   # 4 pages, in order
        every = [s.id for s in c.list_sessions(limit=3)]
        assert [sid for sid in every if sid in ids] == ids and len(every) == len(set(every))
        page = c.list_sessions_page(metadata={"run": run}, limit=3)
        assert [s.id for s in page.data] == ids[:3] and page.has_more and page.next_cursor
        rest = c.list_sessions_page(metadata={"run": run}, limit=5, cursor=page.next_cursor)
        assert [s.id for s in rest.data] == ids[3:] and not rest.has_more and rest.next_cursor is None
        assert [s.id for s in c.list_sessions(name=f"{run}-1", limit=1)] == ids[1::2]
        assert [s.id for s in c.list_sessions(metadata={"run": run, "odd": True})] == ids[1::2]
        assert [s.id for s in c.list_sessions(metadata={"run": run, "i": 4})] == [ids[4]]
        assert c.list_sessions(metadata={"run": run, "i": "nope"}) == []
        first = c.iter_sessions(metadata={"run": run}, limit=2)
        assert [next(first).id, next(first).id, next(first).id] == ids[:3]  # read page by page


# -- command line ------------------------------------------------------------------------------------

@pytest.fixture
def cli(server) -> Callable[..., Any]:
    runner = CliRunner()
    env = {"ATLAS_URL": server.url, "ATLAS_API_KEY": KEY, "ATLAS_RETRIES": "0"}
    return lambda *args, **kw: runner.invoke(atlas_app, list(args), env={**env, **kw.pop("env", {})}, **kw)


def test_cli_set_and_list(cli, sdk):
    sid = sdk.create_session().id
    r = cli("sessions", "set", sid, "--name", "draft [v1]", "--ttl", "900", "--sliding", "--meta", "team=ml",
            "--meta", "n=3")
    assert r.exit_code == 0, r.output
    s = sdk.get_session(sid)
    assert (s.name, s.ttl_s, s.sliding_ttl, s.metadata) == ("draft [v1]", 900, True, {"team": "ml", "n": "3"})
    r = cli("sessions", "set", sid, "--meta", "stage=2")                    # merged into what it has
    assert r.exit_code == 0 and sdk.get_session(sid).metadata == {"team": "ml", "n": "3", "stage": "2"}
    r = cli("sessions")
    row = next(line for line in r.stdout.splitlines() if sid in line)
    assert r.exit_code == 0 and "draft [v1]" in row and "900 s sliding" in row
    assert "team=ml, n=3, stage=2" in row
    r = cli("sessions", "--json", "--meta", "team=ml", "--name", "draft [v1]")
    assert r.exit_code == 0 and [json.loads(line)["id"] for line in r.stdout.splitlines()] == [sid]
    r = cli("sessions", "set", sid, "--meta", "only=this", "--clear-meta", "--no-name", "--no-ttl",
            "--no-sliding")
    s = sdk.get_session(sid)
    assert r.exit_code == 0
    assert (s.name, s.ttl_s, s.sliding_ttl, s.metadata) == (None, None, False, {"only": "this"})
    assert cli("sessions", "set", sid, "--clear-meta").exit_code == 0 and sdk.get_session(sid).metadata == {}
    for bad in ([], ["--name", "a", "--no-name"], ["--ttl", "5", "--no-ttl"], ["--meta", "novalue"],
                ["--ttl", "0"]):
        assert cli("sessions", "set", sid, *bad).exit_code == EXIT_USAGE, bad
    r = cli("sessions", "set", "no-such-session", "--name", "x")
    assert r.exit_code == EXIT_NOT_FOUND and "session_not_found" in r.stderr


def test_cli_export_and_import(cli, sdk, labelled, tmp_path):
    path = tmp_path / "out.atlas-session"
    r = cli("sessions", "export", labelled, "-o", str(path))
    assert r.exit_code == 0, r.output
    assert path.read_bytes() == sdk.export_state(labelled) and f"{path.stat().st_size:,} bytes" in r.stderr
    r = cli("sessions", "export", labelled, "-o", "-")
    assert r.exit_code == 0 and r.stdout_bytes == path.read_bytes()
    r = cli("sessions", "import", str(path), "--ttl", "300")
    assert r.exit_code == 0, r.output
    new = r.stdout.strip()
    s = sdk.get_session(new)
    assert same(s, sdk.get_session(labelled)) and s.ttl_s == 300 and "the book" in r.stderr
    assert greedy(sdk, new) == greedy(sdk, labelled)
    r = cli("sessions", "import", "-", input=path.read_bytes())
    assert r.exit_code == 0 and same(sdk.get_session(r.stdout.strip()), s)
    damaged = tmp_path / "damaged.atlas-session"
    damaged.write_bytes(path.read_bytes()[:-7])
    r = cli("sessions", "import", str(damaged))
    assert r.exit_code == EXIT_ERROR and r.stdout == ""
    assert "400 invalid_session_file" in r.stderr and "bytes" in r.stderr     # the server's reason
    assert cli("sessions", "import", str(tmp_path / "nope")).exit_code == EXIT_USAGE
    r = cli("sessions", "export", "no-such-session", "-o", str(tmp_path / "x"))
    assert r.exit_code == EXIT_NOT_FOUND and not (tmp_path / "x").exists()


def test_cli_marks_broken_sessions(cli, server):
    """A session whose stored metadata is damaged is listed, marked broken, and can be removed."""
    with AtlasClient(server.url, "k-broke") as c:
        bad, good = c.create_session().id, c.create_session().id
        with redis.Redis(unix_socket_path=str(server.workdir / "data" / "redis.sock")) as raw:
            raw.hset(f"atlas:{{{bad}}}:s", "created", "not a time")
        assert c.get_session(good).broken is None
        with pytest.raises(Conflict):
            c.get_session(bad)
    r = cli("sessions", env={"ATLAS_API_KEY": "k-broke"})
    rows = {sid: next(line for line in r.stdout.splitlines() if sid in line) for sid in (bad, good)}
    assert r.exit_code == 0 and "broken" in rows[bad] and "broken" not in rows[good]
    assert cli("sessions", "rm", bad, env={"ATLAS_API_KEY": "k-broke"}).exit_code == 0


def test_import_refuses_files_of_another_model(server, sdk, labelled):
    """A file whose fingerprint names another model is a Conflict ``foreign_model`` (409)."""
    from safetensors import safe_open
    from safetensors.torch import save

    data = sdk.export_state(labelled)
    path = Path(server.workdir) / "foreign.atlas-session"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["atlas"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info["fingerprint"] = "0" * len(info["fingerprint"])
    with pytest.raises(Conflict) as e:
        sdk.import_state(save(tensors, metadata={"atlas": json.dumps(info)}))
    assert e.value.code == "foreign_model"


# -- without a server: what the client decides by itself ---------------------------------------------

def test_an_interrupted_download_starts_over_when_the_target_can_be_rewound():
    calls: list[str] = []

    class Cut(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"A" * 100
            raise httpx.ReadError("cut")

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) % 2:                                   # every other answer breaks off
            return httpx.Response(200, stream=Cut())
        return httpx.Response(200, content=b"B" * 300)

    with AtlasClient("http://atlas.test", "k", transport=httpx.MockTransport(answer), backoff=0.01) as c:
        assert c.export_state("s") == b"B" * 300 and calls == ["/v1/sessions/s/state"] * 2
        target = io.BytesIO(b"head")
        target.seek(4)
        assert c.export_state("s", target) == 300 and target.getvalue() == b"head" + b"B" * 300
        with pytest.raises(AtlasError) as e:                 # a stream cannot take back what it was sent
            c.export_state("s", Pipe())
        assert e.value.code == "connection_lost"


def test_too_many_sessions_is_not_retried():
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(429, json={"error": {"code": "too_many_sessions", "message": "delete some"}})

    with AtlasClient("http://atlas.test", "k", transport=httpx.MockTransport(answer), backoff=0.01) as c:
        with pytest.raises(Busy) as e:
            c.import_state(b"file")
        assert e.value.code == "too_many_sessions" and calls == ["/v1/sessions/import"]
