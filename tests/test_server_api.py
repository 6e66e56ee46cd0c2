"""The HTTP API in process (Starlette's TestClient over the ASGI app): routes, auth and tenants,
limits, and one JSON error shape for every failure path."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from atlas.engine import Atlas, SamplingParams, save_checkpoint
from atlas.engine.runtime import RuntimeSettings
from atlas.server.app import create_app
from atlas.server.errors import ENGINE_ERRORS, HTTP_CODES, STATUS
from atlas.server.settings import ServerSettings

from .helpers import document
from .server_helpers import parse_sse

KEYS = "k-acme:acme,k-globex:globex"
ACME = {"Authorization": "Bearer k-acme"}
GLOBEX = {"Authorization": "Bearer k-globex"}
LOOPBACK = ("127.0.0.1", 50000)


@contextmanager
def serve(atlas, store, client: tuple[str, int] = LOOPBACK, runtime: RuntimeSettings | None = None,
          **settings) -> Iterator[TestClient]:
    app = create_app(ServerSettings(**{"api_keys": KEYS, **settings}), atlas=atlas, store=store,
                     runtime_settings=runtime)
    with TestClient(app, client=client, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def client(fast_atlas, store):
    with serve(fast_atlas, store, max_tokens=64, max_body_bytes=1 << 20) as c:
        yield c


def error(r, status: int, code: str) -> dict:
    """Assert the one error shape, with its status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def new_session(c, headers=ACME) -> str:
    r = c.post("/v1/sessions", headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ingest(c, sid, data: bytes, offset=None, headers=ACME) -> list:
    params = {} if offset is None else {"offset": offset}
    r = c.post(f"/v1/sessions/{sid}/ingest", params=params, content=data,
               headers={**headers, "Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(r.text)


def generate(c, sid, headers=ACME, **body) -> list:
    r = c.post(f"/v1/sessions/{sid}/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return parse_sse(r.text)


def test_sessions_lifecycle(client):
    r = client.post("/v1/sessions", headers=ACME, json={"ttl_s": 3600})
    assert r.status_code == 201
    s = r.json()
    assert {"id", "tokens", "bytes_committed", "state_bytes", "created", "updated"} <= set(s)
    assert s["tokens"] == 0 and s["bytes_committed"] == 0 and s["ttl_s"] == 3600
    sid = s["id"]
    text = b"To be, or not to be, that is the question. " * 40
    events = ingest(client, sid, text)
    assert events[-1]["done"] is True and events[-1]["bytes_committed"] == len(text)
    assert all(not e["done"] for e in events[:-1])
    got = client.get(f"/v1/sessions/{sid}", headers=ACME).json()
    assert got["tokens"] == len(text) and got["bytes_committed"] == len(text) and got["state_bytes"] > 0
    assert got["updated"] >= got["created"]
    assert sid in [x["id"] for x in client.get("/v1/sessions", headers=ACME).json()["data"]]

    r = client.post(f"/v1/sessions/{sid}/fork", headers=ACME)
    assert r.status_code == 201
    child = r.json()
    assert child["id"] != sid and child["forked_from"] == sid
    assert (child["tokens"], child["bytes_committed"]) == (got["tokens"], got["bytes_committed"])
    same = dict(prompt="\nHAMLET:", max_tokens=12, temperature=0)
    assert generate(client, sid, **same) == generate(client, child["id"], **same)

    assert client.delete(f"/v1/sessions/{sid}", headers=ACME).status_code == 204
    error(client.get(f"/v1/sessions/{sid}", headers=ACME), 404, "session_not_found")
    error(client.delete(f"/v1/sessions/{sid}", headers=ACME), 404, "session_not_found")
    assert client.get(f"/v1/sessions/{child['id']}", headers=ACME).status_code == 200


def test_ingest_offsets_resume_and_gap(client):
    doc = document(20_000)
    whole, parts = new_session(client), new_session(client)
    ingest(client, whole, doc)
    ingest(client, parts, doc[:7000], offset=0)
    ingest(client, parts, doc[5000:12000], offset=5000)  # overlap: the first 2000 bytes are skipped
    ingest(client, parts, doc[5000:12000], offset=5000)  # the same piece again: nothing changes
    meta = client.get(f"/v1/sessions/{parts}", headers=ACME).json()
    assert meta["bytes_committed"] == 12000
    err = error(client.post(f"/v1/sessions/{parts}/ingest", params={"offset": 12001}, content=b"x",
                            headers=ACME), 409, "offset_gap")
    assert "12000" in err["message"]
    last = ingest(client, parts, doc[12000:])[-1]  # no offset: append
    assert last["bytes_committed"] == len(doc) and last["tokens"] == len(doc)
    a, b = (client.get(f"/v1/sessions/{s}", headers=ACME).json() for s in (whole, parts))
    assert (a["tokens"], a["bytes_committed"]) == (b["tokens"], b["bytes_committed"])
    for params in (dict(temperature=0), dict(temperature=1.0, seed=7)):
        assert generate(client, whole, prompt="\nKING:", max_tokens=24, **params) == \
            generate(client, parts, prompt="\nKING:", max_tokens=24, **params)


def test_generate_events_fork_and_commit(client):
    sid = new_session(client)
    ingest(client, sid, document(3000))
    events = generate(client, sid, prompt="Q:", max_tokens=10, temperature=0)
    tokens, done = events[:-1], events[-1]
    assert len(tokens) == 10 and all(set(t) == {"text", "token"} for t in tokens)
    assert done["done"] is True and done["finish_reason"] == "length" and done["session"] is None
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12}
    assert client.get(f"/v1/sessions/{sid}", headers=ACME).json()["tokens"] == 3000  # ran on a fork

    done = generate(client, sid, prompt="Q:", max_tokens=5, temperature=0, commit=True)[-1]
    assert 3000 + 2 + 4 <= done["session"]["tokens"] <= 3000 + 2 + 5  # prompt and answer appended
    assert client.get(f"/v1/sessions/{sid}", headers=ACME).json()["tokens"] == done["session"]["tokens"]
    assert done["session"]["bytes_committed"] == 3000  # the document is unchanged


def test_completions_openai_shape(client):
    sid = new_session(client)
    ingest(client, sid, document(5000))
    body = dict(model="atlas-demo", prompt="\nROMEO:", max_tokens=8, temperature=0, session_id=sid)
    r = client.post("/v1/completions", json=body, headers=ACME)
    assert r.status_code == 200
    c = r.json()
    assert c["object"] == "text_completion" and c["model"] == "atlas-demo" and c["id"].startswith("cmpl-")
    assert c["choices"][0]["finish_reason"] == "length" and c["choices"][0]["logprobs"] is None
    assert c["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}

    r = client.post("/v1/completions", headers=ACME,
                    json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    usage, final, chunks = events[-2], events[-3], events[:-3]
    assert usage["choices"] == [] and usage["usage"] == c["usage"]
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["text"] == ""
    for ch in chunks:
        assert set(ch) == {"id", "object", "created", "model", "choices", "usage"}
        assert ch["object"] == "text_completion" and ch["usage"] is None
        assert ch["choices"][0]["finish_reason"] is None and ch["choices"][0]["index"] == 0
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["choices"][0]["text"]
    assert len({ch["id"] for ch in events[:-1]}) == 1

    # without include_usage: no usage chunk and no usage field
    events = parse_sse(client.post("/v1/completions", headers=ACME, json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    # the session never changes; a prompt without session starts from an empty state
    assert client.get(f"/v1/sessions/{sid}", headers=ACME).json()["tokens"] == 5000
    empty = client.post("/v1/completions", headers=ACME, json={**body, "session_id": None}).json()
    assert empty["usage"]["prompt_tokens"] == 7
    # token-id prompts, one-element lists, stop strings
    ids = client.post("/v1/completions", headers=ACME, json={**body, "prompt": list(b"\nROMEO:")}).json()
    assert ids["choices"][0]["text"] == c["choices"][0]["text"]
    one = client.post("/v1/completions", headers=ACME, json={**body, "prompt": ["\nROMEO:"]}).json()
    assert one["choices"][0]["text"] == c["choices"][0]["text"]
    text = c["choices"][0]["text"]
    if text[2:4]:
        stopped = client.post("/v1/completions", headers=ACME, json={**body, "stop": [text[2:4]]}).json()
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["choices"][0]["text"] == text[:text.index(text[2:4])]


def test_models_health_ready_metrics_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/ready").json() == {"status": "ready", "model": "atlas-demo"}
    models = client.get("/v1/models", headers=ACME).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["atlas-demo"]
    assert client.get("/v1/models/atlas-demo", headers=ACME).json()["object"] == "model"
    error(client.get("/v1/models/gpt-4", headers=ACME), 404, "model_not_found")
    sid = new_session(client)
    ingest(client, sid, document(4000))
    generate(client, sid, max_tokens=4)
    text = client.get("/metrics", headers=ACME).text
    for name in ("atlas:time_to_first_token_seconds_bucket", "atlas:inter_token_latency_seconds_bucket",
                 "atlas:e2e_request_latency_seconds_count", "atlas:ingest_tokens_total",
                 "atlas:generation_tokens_total", "atlas:num_requests_running", "atlas:num_requests_waiting",
                 "atlas:state_bytes", "atlas:store_save_seconds_bucket", "atlas:store_load_seconds_count",
                 "atlas:cache_hits_total", "atlas:cache_misses_total", "atlas:ingest_tokens_per_second_count",
                 'atlas:request_success_total{finished_reason="length"}', "atlas:http_requests_total"):
        assert name in text, name
    spec = client.get("/openapi.json", headers=ACME).json()
    assert {"/v1/sessions", "/v1/sessions/{sid}/ingest", "/v1/completions", "/health"} <= set(spec["paths"])
    assert "text/plain" in spec["paths"]["/v1/sessions/{sid}/ingest"]["post"]["requestBody"]["content"]


def test_auth_and_tenant_isolation(client):
    sid = new_session(client, ACME)
    ingest(client, sid, b"acme's secret document")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-acme"},
                    {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                             ("GET", f"/v1/sessions/{sid}"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("GET", "/openapi.json"), ("POST", "/v1/completions")):
            r = client.request(method, path, headers=headers)
            error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        # the key is checked before the body: a stranger learns nothing of what its body lacks
        bodies = ((b"{bad", "application/json"), (b"x", "text/plain"), (b"[]", "application/json"))
        for content, kind in bodies:
            for path in ("/v1/sessions", "/v1/completions", f"/v1/sessions/{sid}/ingest", "/tokenize"):
                r = client.post(path, content=content, headers={**headers, "Content-Type": kind})
                error(r, 401, "unauthorized")
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    # another tenant's session does not exist for this one
    for method, path, kw in (("GET", f"/v1/sessions/{sid}", {}), ("DELETE", f"/v1/sessions/{sid}", {}),
                             ("POST", f"/v1/sessions/{sid}/fork", {}),
                             ("POST", f"/v1/sessions/{sid}/ingest", {"content": b"x"}),
                             ("POST", f"/v1/sessions/{sid}/generate", {"json": {}}),
                             ("POST", "/v1/completions", {"json": {"prompt": "x", "session_id": sid}})):
        error(client.request(method, path, headers=GLOBEX, **kw), 404, "session_not_found")
    assert sid not in [s["id"] for s in client.get("/v1/sessions", headers=GLOBEX).json()["data"]]
    assert client.get(f"/v1/sessions/{sid}", headers=ACME).json()["bytes_committed"] == 22


def test_no_keys_serves_loopback_only(fast_atlas, store):
    with serve(fast_atlas, store, api_keys="") as c:
        sid = new_session(c, {})
        assert c.get(f"/v1/sessions/{sid}").status_code == 200  # tenant "default", any or no key
        assert c.get(f"/v1/sessions/{sid}", headers={"Authorization": "Bearer whatever"}).status_code == 200
    with serve(fast_atlas, store, client=("10.1.2.3", 4000), api_keys="") as c:
        error(c.get("/v1/sessions"), 401, "unauthorized")
        assert c.get("/health").status_code == 200
    with serve(fast_atlas, store, client=("10.1.2.3", 4000), api_keys="", allow_remote=True) as c:
        assert c.get("/v1/sessions").status_code == 200


def test_error_shapes(client):
    sid = new_session(client)
    error(client.get("/no/such/route", headers=ACME), 404, "not_found")
    error(client.put("/v1/sessions", headers=ACME), 405, "method_not_allowed")
    error(client.get("/v1/sessions/not-a-session", headers=ACME), 404, "session_not_found")
    error(client.get("/v1/sessions/bad{id}", headers=ACME), 404, "session_not_found")
    bad = [
        ("/v1/sessions", {"ttl_s": -1}),
        ("/v1/sessions", {"nope": 1}),
        (f"/v1/sessions/{sid}/generate", {"max_tokens": "many"}),
        (f"/v1/sessions/{sid}/generate", {"temperature": -1}),
        (f"/v1/sessions/{sid}/generate", {"stop": [""]}),
        (f"/v1/sessions/{sid}/generate", {"top_p": 0}),
        (f"/v1/sessions/{sid}/generate", {"unknown": True}),
        ("/v1/completions", {}),
        ("/v1/completions", {"prompt": 3}),
        ("/v1/completions", {"prompt": [300]}),
        ("/v1/completions", {"prompt": "x", "seed": -5}),
    ]
    for path, body in bad:
        error(client.post(path, json=body, headers=ACME), 422, "invalid_request")
    json_type = {**ACME, "Content-Type": "application/json"}
    error(client.post("/v1/completions", content=b"{not json", headers=json_type), 422, "invalid_request")
    error(client.post(f"/v1/sessions/{sid}/ingest", params={"offset": -1}, content=b"x", headers=ACME),
          422, "invalid_request")
    # n, echo, logprobs, penalties and several prompts are honoured (docs/openai.md; tests/test_openai_*)
    for extra in ({"best_of": 3}, {"n": 2, "best_of": 3}, {"suffix": "x"}, {"use_beam_search": True},
                  {"tools": [{"type": "function"}]}, {"logit_bias": {"256": 1}}):
        error(client.post("/v1/completions", json={"prompt": "x", **extra}, headers=ACME), 400,
              "unsupported_parameter")
    error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 65}, headers=ACME), 400,
          "max_tokens_too_large")
    error(client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 10_000}, headers=ACME), 400,
          "max_tokens_too_large")
    error(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}, headers=ACME), 404,
          "model_not_found")
    error(client.post("/v1/completions", json={"prompt": "x", "session_id": "nope"}, headers=ACME), 404,
          "session_not_found")
    # body limits: announced (Content-Length) and streamed (chunked, no length)
    error(client.post(f"/v1/sessions/{sid}/ingest", content=b"x" * ((1 << 20) + 1), headers=ACME), 413,
          "body_too_large")

    def chunked():
        for _ in range(20):
            yield b"y" * (1 << 16)

    r = client.post(f"/v1/sessions/{sid}/ingest", content=chunked(), headers=ACME)
    if r.status_code == 200:  # the limit was crossed after the event stream had started
        assert parse_sse(r.text)[-1]["error"]["code"] == "body_too_large"
    else:
        error(r, 413, "body_too_large")
    # what was read before the limit stays, like a dropped connection: the session is consistent
    meta = client.get(f"/v1/sessions/{sid}", headers=ACME).json()
    assert meta["bytes_committed"] == meta["tokens"] <= 1 << 20
    error(client.post("/v1/completions", content=b" " * (4 * 1024 * 1024 + 1),
                      headers={**ACME, "Content-Type": "application/json"}), 413, "body_too_large")


def test_limits_sessions_queue_timeout(fast_atlas, store):
    tenant_keys = f"k-{uuid.uuid4().hex}:t-{uuid.uuid4().hex}"
    h = {"Authorization": f"Bearer {tenant_keys.split(':')[0]}"}
    with serve(fast_atlas, store, api_keys=tenant_keys, max_sessions_per_tenant=2, request_timeout_s=0.3,
               max_tokens=1_000_000, runtime=RuntimeSettings(max_requests=2)) as c:
        a, _ = new_session(c, h), new_session(c, h)
        error(c.post("/v1/sessions", headers=h), 429, "too_many_sessions")
        error(c.post(f"/v1/sessions/{a}/fork", headers=h), 429, "too_many_sessions")
        # a generation past the request timeout stops and returns what it has
        done = generate(c, a, headers=h, max_tokens=1_000_000, temperature=0)[-1]
        assert done["finish_reason"] == "timeout" and 0 < done["usage"]["completion_tokens"] < 1_000_000
        r = c.post("/v1/completions", headers=h, json={"prompt": "x", "max_tokens": 1_000_000})
        assert r.json()["choices"][0]["finish_reason"] == "timeout"
        # a full runtime queue: 429 with Retry-After
        rt = c.app.state.services.runtime
        rt.stats.admitted += 2  # two requests in progress elsewhere
        try:
            r = c.post(f"/v1/sessions/{a}/generate", json={"max_tokens": 1}, headers=h)
            error(r, 429, "queue_full")
            assert int(r.headers["retry-after"]) >= 1
            error(c.post(f"/v1/sessions/{a}/ingest", content=b"abc", headers=h), 429, "queue_full")
        finally:
            rt.stats.admitted -= 2
        assert generate(c, a, headers=h, max_tokens=1)[-1]["done"] is True


def test_corrupt_state_is_a_clear_error_and_the_server_lives_on(fast_atlas, store):
    with serve(fast_atlas, store) as c:
        sid, sid2 = new_session(c), new_session(c)
    # state bytes that pass the store's checksums but are not a state of this model
    store.put(sid, b"not a safetensors file", fingerprint=fast_atlas.fingerprint, tokens=5,
              bytes_committed=5)
    # and a part damaged inside Redis: the store's checksum refuses it
    store.put(sid2, fast_atlas.save_state(fast_atlas.new_state()), fingerprint=fast_atlas.fingerprint)
    raw = redis.Redis(unix_socket_path=store.socket_path)
    parts = [k for k in raw.scan_iter(match=f"*{{{sid2}}}*") if raw.type(k) == b"string"]
    assert parts
    for k in parts:
        raw.setrange(k, 0, b"garbage!")
    raw.close()
    with serve(fast_atlas, store) as c:  # a fresh runtime: nothing cached
        for s in (sid, sid2):
            error(c.post(f"/v1/sessions/{s}/generate", json={"max_tokens": 2}, headers=ACME), 409,
                  "state_corrupt")
            error(c.post(f"/v1/sessions/{s}/ingest", content=b"more", headers=ACME), 409, "state_corrupt")
            error(c.post("/v1/completions", json={"prompt": "x", "session_id": s}, headers=ACME), 409,
                  "state_corrupt")
        assert c.get(f"/v1/sessions/{sid}", headers=ACME).status_code == 200  # metadata still readable
        assert c.delete(f"/v1/sessions/{sid}", headers=ACME).status_code == 204  # and it can be removed
        ok = new_session(c)
        ingest(c, ok, b"the server lives on")
        assert generate(c, ok, max_tokens=2)[-1]["done"] is True


def test_not_ready_and_draining(fast_atlas, store, tmp_path):
    settings = ServerSettings(api_keys=KEYS, model=str(tmp_path / "no-such-checkpoint"))
    with TestClient(create_app(settings, store=store), client=LOOPBACK) as c:
        for _ in range(100):
            if c.app.state.load_error:
                break
            time.sleep(0.05)
        # the folder cannot load: every route says so, with the file and the fix
        assert "no-such-checkpoint" in error(c.get("/ready"), 503, "checkpoint_invalid")["message"]
        error(c.get("/health"), 503, "checkpoint_invalid")
        error(c.get("/v1/sessions", headers=ACME), 503, "checkpoint_invalid")
    with serve(fast_atlas, store) as c:
        c.app.state.draining = True
        error(c.get("/v1/sessions", headers=ACME), 503, "shutting_down")
        error(c.get("/ready"), 503, "shutting_down")
        assert c.get("/health").status_code == 200
        c.app.state.draining = False


def test_lone_surrogates_are_refused_not_a_server_error(client) -> None:
    """JSON may carry lone surrogates; they are not text, and get a clear 422."""
    body = '{"prompt": "\\ud9bc x", "max_tokens": 2}'
    for path in ("/v1/completions",):
        r = client.post(path, content=body, headers={**ACME, "Content-Type": "application/json"})
        error(r, 422, "invalid_request")


def test_sse_events_stay_one_line_for_any_text() -> None:
    """Generated text may hold U+0085, U+2028 or U+2029, which JSON leaves as they are but
    str.splitlines (httpx's iter_lines) breaks lines at: each event must still be one line."""
    import json

    from atlas.server.streaming import sse

    text = "a\x85b\u2028c\u2029d\x0be\x1cf\r\ng"
    event = sse({"text": text}).decode()
    assert event.endswith("\n\n") and len(event.splitlines()) == 2 and event.splitlines()[1] == ""
    assert json.loads(event.splitlines()[0].removeprefix("data: "))["text"] == text


def test_json_routes_refuse_other_content_types(client) -> None:
    """``curl -d '{...}'`` without ``-H 'Content-Type: application/json'`` sends a form type: the
    answer is a 415 that says what to send, not a puzzling 422."""
    sid = new_session(client)
    body = b'{"prompt": "x", "max_tokens": 2}'
    curl = {**ACME, "User-Agent": "curl/8.5.0", "Accept": "*/*",
            "Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    err = error(client.post(f"/v1/sessions/{sid}/generate", content=body, headers=curl), 415,
                "unsupported_media_type")
    assert "send Content-Type: application/json" in err["message"]
    assert "application/x-www-form-urlencoded" in err["message"]
    for path in (f"/v1/sessions/{sid}/generate", "/v1/completions", "/v1/sessions"):
        for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data", None):
            headers = {**ACME, "Content-Type": content_type} if content_type else ACME
            err = error(client.post(path, content=body, headers=headers), 415, "unsupported_media_type")
            assert "send Content-Type: application/json" in err["message"]
    # JSON with parameters is JSON; a create without a body needs no type; ingest takes text
    r = client.post(f"/v1/sessions/{sid}/generate", content=body,
                    headers={**ACME, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and parse_sse(r.text)[-1]["done"] is True
    assert client.post("/v1/sessions", headers=ACME).status_code == 201
    assert ingest(client, sid, b"plain text")[-1]["done"] is True


def _subclasses(roots: tuple[type, ...]) -> set[type]:
    seen, todo = set(roots), list(roots)
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


def test_every_error_code_has_one_http_status() -> None:
    """The engine's errors carry only a code and the server's one table gives its status, so a new
    error class cannot silently become a 500."""
    import atlas.engine

    for module in pkgutil.walk_packages(atlas.engine.__path__, "atlas.engine."):
        importlib.import_module(module.name)  # every error class the engine defines is loaded
    with_code = {c for c in _subclasses((Exception,))
                 if c.__module__.startswith("atlas.engine") and hasattr(c, "code")}
    engine_errors = _subclasses(ENGINE_ERRORS)
    assert with_code <= engine_errors, "an engine error outside ENGINE_ERRORS falls through to 500"
    for cls in engine_errors:
        assert cls.code in STATUS, f"{cls.__qualname__}.code {cls.code!r} has no HTTP status"
        assert not hasattr(cls, "status") and not hasattr(cls, "http_status"), cls
    assert STATUS["state_corrupt"] == 409 and STATUS["store_unavailable"] == 503
    assert all(STATUS[code] == status for status, code in HTTP_CODES.items())
    # and every code the server raises itself
    import atlas.server

    raised = [(path.name, node.args[0].value)
              for path in Path(atlas.server.__file__).parent.rglob("*.py")
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ApiError"
              and node.args and isinstance(node.args[0], ast.Constant)]
    assert len(raised) > 10 and all(code in STATUS for _, code in raised), raised


def test_merged_choices_close_cleanly_when_the_client_leaves() -> None:
    """The choices of a streamed completion (n > 1) are read by one task each; a client that leaves
    while the reader waits on them cancels it, and every choice's stream is closed, without the
    RuntimeError of closing a generator that its task is still iterating."""
    import asyncio

    from atlas.server.routes.completions import merged

    closed: list[int] = []

    async def choice(i: int):
        try:
            yield i
            await asyncio.Event().wait()  # the runtime has no next token yet
            yield -1
        finally:
            closed.append(i)

    async def client() -> None:
        async for _ in merged([choice(0), choice(1), choice(2)]):
            pass

    async def main() -> None:
        reader = asyncio.create_task(client())
        await asyncio.sleep(0.05)  # every choice gave its first item and waits for a second
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(main())
    assert sorted(closed) == [0, 1, 2]


def test_the_models_sampling_defaults_fill_what_a_request_leaves_out(fast_atlas, store, tmp_path):
    """generation_config.json's max_new_tokens and do_sample (or temperature, top_p, top_k) are the
    defaults of every generation route and of Atlas.generate; a request's own fields still win."""
    save_checkpoint(fast_atlas.model, tmp_path, generation_config={"max_new_tokens": 3, "do_sample": False})
    atlas = Atlas.load(tmp_path, device="cpu")
    assert atlas.generation_defaults == {"max_new_tokens": 3, "temperature": 0.0}
    greedy = atlas.generate(atlas.new_state(), "hi", SamplingParams(max_tokens=3, temperature=0))
    assert [t.id for t in atlas.generate(atlas.new_state(), "hi")] == [t.id for t in greedy]
    with serve(atlas, store) as c:
        for _ in range(2):  # greedy: the same three tokens every time
            r = c.post("/v1/completions", headers=ACME, json={"prompt": "hi"}).json()
            assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["text"] == greedy.text
        chat = {"messages": [{"role": "user", "content": "x"}]}
        r = c.post("/v1/chat/completions", headers=ACME, json=chat)
        assert r.json()["usage"]["completion_tokens"] == 3
        sid = new_session(c)
        assert generate(c, sid, prompt="hi")[-1]["usage"]["completion_tokens"] == 3
        r = c.post("/v1/completions", headers=ACME, json={"prompt": "hi", "max_tokens": 5}).json()
        assert r["usage"]["completion_tokens"] == 5
