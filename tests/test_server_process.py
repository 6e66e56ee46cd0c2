"""The server as users run it: ``atlas serve`` in its own process, over real sockets.

Streaming, disconnects, SIGKILL and restarts, SIGTERM draining, the official ``openai`` client and a
schemathesis run over the OpenAPI document all need a real server process; the model is a tiny fast
checkpoint (tests/helpers.FAST) because the point here is the protocol.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from bench.server_process import GRACEFUL, ServerProcess

from .helpers import document
from .server_helpers import kill_embedded_redis, parse_sse, running_server, sse_events, stop_embedded_redis

ACME = {"Authorization": "Bearer k-acme"}


@pytest.fixture(scope="module")
def server(fast_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("main")
    with running_server(work, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_MAX_TOKENS": "100000",
                               "ATLAS_API_KEYS": "k-acme:acme,k-globex:globex",
                               "ATLAS_MAX_BODY_BYTES": str(8 << 20)}) as srv:
        yield srv


def client(srv: ServerProcess, headers=ACME, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=headers, timeout=timeout)


def pieces(data: bytes, size: int = 1 << 16, delay: float = 0.0):
    for i in range(0, len(data), size):
        if delay:
            time.sleep(delay)
        yield data[i:i + size]


def ingest(c: httpx.Client, sid: str, data: bytes, offset: int | None = None) -> dict:
    params = {} if offset is None else {"offset": offset}
    r = c.post(f"/v1/sessions/{sid}/ingest", params=params, content=pieces(data),
               headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    last = parse_sse(r.text)[-1]
    assert last.get("done") is True, last
    return last


def continuation(c: httpx.Client, sid: str, **params) -> list[int]:
    body = {"prompt": "\nROMEO:", "max_tokens": 32, "temperature": 0, **params}
    r = c.post(f"/v1/sessions/{sid}/generate", json=body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] == body["max_tokens"]
    return [e["token"] for e in events[:-1]]


def same_session(c: httpx.Client, a: str, b: str) -> None:
    """Equal counters, and equal continuations, greedy and sampled with a seed."""
    ma, mb = c.get(f"/v1/sessions/{a}").json(), c.get(f"/v1/sessions/{b}").json()
    assert (ma["tokens"], ma["bytes_committed"]) == (mb["tokens"], mb["bytes_committed"])
    assert continuation(c, a) == continuation(c, b)
    assert continuation(c, a, temperature=1.0, seed=3) == continuation(c, b, temperature=1.0, seed=3)


def test_openai_client_streams_from_a_session(server):
    with client(server) as c:
        sid = c.post("/v1/sessions").json()["id"]
        ingest(c, sid, document(50_000))
        native = "".join(e.get("text", "") for e in parse_sse(
            c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "\nROMEO:", "max_tokens": 24,
                                                         "temperature": 0}).text))
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="k-acme", max_retries=0)
    model = oai.models.list().data[0].id
    assert model == "fast-atlas"  # the checkpoint directory's name
    stream = oai.completions.create(model=model, prompt="\nROMEO:", max_tokens=24, temperature=0, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"session_id": sid})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert text == native and reasons[-1] == "length" and set(reasons[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (7, 24)
    assert usage.total_tokens == 31
    whole = oai.completions.create(model=model, prompt="\nROMEO:", max_tokens=24, temperature=0,
                                   extra_body={"session_id": sid})
    assert whole.choices[0].text == native and whole.usage.completion_tokens == 24
    # errors reach the client as its own exception types
    with pytest.raises(openai.BadRequestError):  # a field the server does not honour
        oai.completions.create(model=model, prompt="x", suffix="y")
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=model, prompt="x", extra_body={"session_id": "0" * 32})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):  # another tenant's session
        openai.OpenAI(base_url=server.url + "/v1", api_key="k-globex", max_retries=0).completions.create(
            model=model, prompt="x", extra_body={"session_id": sid})


@pytest.mark.slow
def test_5mb_in_one_request_equals_several_with_offsets(server):
    """One 5 MB request, and the same document in pieces with offsets (one piece sent twice, one
    overlapping), run at the same time: the same session."""
    doc = document(5_000_000)
    with client(server) as c:
        one, many = (c.post("/v1/sessions").json()["id"] for _ in range(2))
        results: dict[str, dict] = {}

        def whole() -> None:
            results["one"] = ingest(c, one, doc)

        def several() -> None:
            for start, end in ((0, 1_200_000), (1_200_000, 2_600_000), (1_200_000, 2_600_000),
                               (2_500_000, 4_100_000), (4_100_000, 5_000_000)):
                results["many"] = ingest(c, many, doc[start:end], offset=start)

        threads = [threading.Thread(target=whole), threading.Thread(target=several)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["one"]["bytes_committed"] == results["many"]["bytes_committed"] == len(doc)
        assert results["one"]["tokens"] == results["many"]["tokens"] == len(doc)
        same_session(c, one, many)


def running(srv: ServerProcess) -> tuple[float, float]:
    text = httpx.get(srv.url + "/metrics", headers=ACME).text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return get("atlas:num_requests_running"), get("atlas:num_requests_waiting")


def wait_idle(srv: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while running(srv) != (0, 0):
        assert time.monotonic() < deadline, "the runtime kept working for a client that left"
        time.sleep(0.05)


def test_client_disconnect_cancels_the_work(server):
    with client(server) as c:
        sid = c.post("/v1/sessions").json()["id"]
        ingest(c, sid, document(20_000))
        # a generation of 100k tokens, abandoned after a few
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 100_000}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(sse_events(r.iter_lines())):
                if i == 5:
                    break
        wait_idle(server)
        assert c.get(f"/v1/sessions/{sid}").json()["tokens"] == 20_000

        # an upload that dies half way: the session keeps a consistent prefix and resumes from it
        doc = document(600_000)

        def dying():
            yield from pieces(doc[:300_000], 8192, delay=0.002)
            raise ConnectionAbortedError("client crashed")

        with pytest.raises(Exception):  # noqa: B017 - whatever the transport makes of it
            c.post(f"/v1/sessions/{sid}/ingest", params={"offset": 20_000}, content=dying())
        wait_idle(server)
        meta = c.get(f"/v1/sessions/{sid}").json()
        assert 20_000 <= meta["bytes_committed"] <= 320_000 and meta["tokens"] == meta["bytes_committed"]
        last = ingest(c, sid, doc[meta["bytes_committed"] - 20_000:], offset=meta["bytes_committed"])
        assert last["bytes_committed"] == last["tokens"] == 620_000


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(server):
    """Without streaming, the answer is one response at the end; a client that times out before it
    (and the official client then retries) must not leave its generations running."""
    bodies = {"/v1/completions": {"prompt": "hi", "max_tokens": 100_000, "n": 4},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": 100_000, "n": 4}}
    for route, body in bodies.items():
        with client(server, timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
            c.post(route, json=body)
        wait_idle(server)
    with client(server) as c:  # and a whole answer still comes back whole
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "n": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(fast_checkpoint, tmp_path):
    srv = ServerProcess(tmp_path, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": "k-acme:acme",
                                   "ATLAS_MAX_TOKENS": "16", "ATLAS_REQUEST_TIMEOUT_S": "5",
                                   "ATLAS_MAX_BODY_BYTES": "65536", "ATLAS_MAX_PROMPT_TOKENS": "4096"})
    srv.start()
    try:
        with client(srv) as c:  # a real session, so the session routes get past 404
            sid = c.post("/v1/sessions").json()["id"]
            ingest(c, sid, document(10_000))
        config = tmp_path / "schemathesis.toml"
        config.write_text(f'[parameters]\n"path.sid" = "{sid}"\n')
        st = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]
        out = subprocess.run(
            [*st, "--config-file", str(config), "run", srv.url + "/openapi.json",
             "--checks", "not_a_server_error", "--header", "Authorization: Bearer k-acme",
             "--max-examples", "15", "--max-time", "35", "--seed", "0",  # reproducible in CI
             "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--workers", "1",
             "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        summary = out.stdout[-4000:] + out.stderr[-2000:]
        print(summary)  # shown with -s: operations tested, cases generated
        assert out.returncode == 0, summary
        assert "Server error" not in out.stdout and " 500 " not in srv.log(), summary
        assert "Traceback" not in srv.log(), srv.log()[-4000:]
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()
            stop_embedded_redis(tmp_path / "data")


@pytest.mark.slow
def test_kill_9_mid_ingest_then_resume_restart_and_drain(fast_checkpoint, tmp_path):
    """SIGKILL the server (and its embedded Redis) in the middle of an ingest; restart; resume from
    ``bytes_committed``: the session equals an uninterrupted ingest. Then sessions survive a graceful
    restart, and SIGTERM lets a running generation finish."""
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_CHECKPOINT_TOKENS": "8192",
                                   "ATLAS_INGEST_CHUNKS_PER_STEP": "1", "ATLAS_LEASE_TTL_MS": "1500",
                                   "ATLAS_DRAIN_TIMEOUT_S": "20"},
                        host="0.0.0.0")  # no API keys: it must refuse and bind loopback only
    srv.start()
    try:
        assert "binding 127.0.0.1 instead of 0.0.0.0" in srv.log()
        assert "Uvicorn running on http://127.0.0.1:" in srv.log()
        doc = document(1_000_000)
        c = httpx.Client(base_url=srv.url, timeout=120)
        sid = c.post("/v1/sessions").json()["id"]

        def upload() -> None:
            try:
                c.post(f"/v1/sessions/{sid}/ingest", params={"offset": 0}, content=pieces(doc, 16384, 0.01))
            except httpx.HTTPError:
                pass  # the server died under it

        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["bytes_committed"] < 150_000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.kill()
        assert kill_embedded_redis(data) is not None  # only the append-only file survives
        uploader.join()

        srv.start()
        c = httpx.Client(base_url=srv.url, timeout=120)
        meta = c.get(f"/v1/sessions/{sid}").json()
        done = meta["bytes_committed"]
        assert 150_000 <= done < len(doc) and meta["tokens"] == done
        # resume (overlapping the last 1000 bytes); the dead writer's lease may still be running out
        deadline = time.monotonic() + 10
        while True:
            r = c.post(f"/v1/sessions/{sid}/ingest", params={"offset": done - 1000},
                       content=doc[done - 1000:])
            if r.status_code != 409:
                break
            assert r.json()["error"]["code"] == "lease_conflict" and time.monotonic() < deadline
            time.sleep(0.2)
        assert r.status_code == 200 and parse_sse(r.text)[-1]["bytes_committed"] == len(doc)
        ref = c.post("/v1/sessions").json()["id"]
        ingest(c, ref, doc)
        same_session(c, sid, ref)

        # graceful restart: every session is still there, the same
        before = c.get("/v1/sessions").json()["data"]
        expected = continuation(c, sid)
        assert srv.stop() in GRACEFUL
        srv.start()
        c = httpx.Client(base_url=srv.url, timeout=120)
        after = c.get("/v1/sessions").json()["data"]
        assert [(s["id"], s["tokens"], s["bytes_committed"], s["generation"]) for s in after] == \
            [(s["id"], s["tokens"], s["bytes_committed"], s["generation"]) for s in before]
        assert continuation(c, sid) == expected

        # SIGTERM while a generation streams: it finishes, then the process exits cleanly
        got: list = []
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 600}) as r:
            for ev in sse_events(r.iter_lines()):
                got.append(ev)
                if len(got) == 3:
                    srv.proc.send_signal(15)
        assert got[-1]["done"] is True and got[-1]["usage"]["completion_tokens"] == 600
        assert srv.proc.wait(30) in GRACEFUL
        assert "atlas.server: stopped" in srv.log() and "Application shutdown complete" in srv.log()
    finally:
        srv.kill()
        stop_embedded_redis(data)
