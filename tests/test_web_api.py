"""What browsers and real clients need around the API: CORS, request ids (headers, error bodies, log
lines), ``/tokenize`` and ``/detokenize``, a 404 that lists the routes, 405 with ``Allow``.

Two ``atlas serve`` processes, started together: one with CORS on (for the page's origin and
``http://allowed.example``) and JSON logs, one with the defaults (CORS off, text logs). The browser
test opens ``tests/data/cors_page.html`` from a third origin (a static file server on its own port)
in headless Chromium: against the first server every call works, the streamed one too; against the
second every call fails, as CORS says. Draining and an unhandled exception are checked in process.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from atlas_client import AsyncAtlasClient, AtlasClient, ChatCompletion, NotFound
from fastapi import FastAPI
from starlette.testclient import TestClient
from typer.testing import CliRunner

from atlas.engine import Atlas
from atlas.engine.chat_template import render_chat
from atlas.server.app import create_app
from atlas.server.cli import app as atlas_app
from atlas.server.errors import STATUS
from atlas.server.logs import JsonFormatter, RequestIdFilter, TextFormatter, request_id
from atlas.server.settings import ServerSettings
from bench.server_process import GRACEFUL, ServerProcess, free_port

from .helpers import document
from .server_helpers import parse_sse, stop_embedded_redis

KEY = "k-web"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = "http://allowed.example"
PAGE = Path(__file__).parent / "data" / "cors_page.html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_SESSIONS = 4  # per tenant, on the CORS server: the 429 test fills tenant "full" up to it
HEX_ID = re.compile(r"[0-9a-f]{32}")


# -- servers ------------------------------------------------------------------------------------------

class StaticSite:
    """A plain file server on a loopback port of its own: the page's origin."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StaticSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@dataclass
class Servers:
    site: StaticSite
    cors: ServerProcess  # ATLAS_CORS_ORIGINS = the site's origin and ALLOWED; JSON logs
    plain: ServerProcess  # the defaults: no CORS, text logs


@pytest.fixture(scope="module")
def servers(fast_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("site")
    shutil.copy(PAGE, root / "page.html")
    with StaticSite(root) as site:
        common = {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": f"{KEY}:web,k-full:full"}
        cors = ServerProcess(tmp_path_factory.mktemp("cors"), {
            **common, "ATLAS_CORS_ORIGINS": f"{site.origin}, {ALLOWED}", "ATLAS_LOG_FORMAT": "json",
            "ATLAS_MAX_SESSIONS_PER_TENANT": str(MAX_SESSIONS), "ATLAS_MAX_BODY_BYTES": "300000",
            "ATLAS_PROGRESS_INTERVAL_S": "0"})
        plain = ServerProcess(tmp_path_factory.mktemp("plain"), common)
        both = [cors, plain]
        try:
            for srv in both:  # they load at the same time
                srv.spawn()
            for srv in both:
                srv.wait_ready()
            yield Servers(site, cors, plain)
            for srv in both:
                assert srv.stop() in GRACEFUL, srv.log(4000)
        finally:
            for srv in both:
                srv.kill()
                stop_embedded_redis(srv.workdir / "data")


def api(srv: ServerProcess, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=AUTH if headers is None else headers, timeout=60)


def error(r: httpx.Response, status: int, code: str) -> dict:
    """The one error shape, with the request's id in the body and in the header."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    assert err["request_id"] == r.headers["x-request-id"], (err, r.headers)
    return err


def json_lines(srv: ServerProcess) -> list[dict]:
    """The server's log, one JSON object per line (every line must be one)."""
    return [json.loads(line) for line in srv.log().splitlines() if line.strip()]


# -- request ids --------------------------------------------------------------------------------------

def test_request_id_is_kept_made_or_replaced(servers: Servers) -> None:
    with api(servers.cors) as c:
        r = c.get("/v1/models", headers={"X-Request-ID": "trace-42.a:b"})
        assert r.headers["x-request-id"] == "trace-42.a:b"
        made = [c.get("/health").headers["x-request-id"] for _ in range(2)]
        assert all(HEX_ID.fullmatch(m) for m in made) and made[0] != made[1]
        for bad in ["has spaces", "x" * 129, "quote\"s", "semi;colon", ""]:
            got = c.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert HEX_ID.fullmatch(got), (bad, got)
        # on every kind of answer: errors, a streamed one, a 404 route, a 415, a 405
        sid = c.post("/v1/sessions").json()["id"]
        try:
            r = c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "\nA:", "max_tokens": 4},
                       headers={"X-Request-ID": "gen-1"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "gen-1"
            assert parse_sse(r.text)[-1]["done"] is True
            assert error(c.get("/v1/sessions/nope", headers={"X-Request-ID": "e-404"}), 404,
                         "session_not_found")["request_id"] == "e-404"
            error(c.post(f"/v1/sessions/{sid}/generate", content=b"{}",
                         headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
            error(c.get("/v1/no-such-route"), 404, "route_not_found")
            error(c.put("/v1/sessions"), 405, "method_not_allowed")
            error(c.get("/v1/sessions", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
            error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": "5"}), 422, "invalid_request")
        finally:
            c.delete(f"/v1/sessions/{sid}")


def test_error_event_in_a_started_stream_carries_the_request_id(servers: Servers) -> None:
    """The context reaches the code that runs inside a streaming response: an ingest over the body
    limit (300,000 bytes here) after its event stream has started ends with an error event that
    names the request."""
    def body() -> Iterator[bytes]:
        yield b"a" * 100_000
        time.sleep(0.5)  # the stream starts with the first progress event
        for _ in range(4):
            yield b"b" * 100_000

    with api(servers.cors) as c:
        sid = c.post("/v1/sessions").json()["id"]
        try:
            r = c.post(f"/v1/sessions/{sid}/ingest", content=body(),
                       headers={"Content-Type": "text/plain", "X-Request-ID": "ingest-over"})
            assert r.headers["x-request-id"] == "ingest-over"
            if r.status_code == 200:
                last = parse_sse(r.text)[-1]
                assert last["error"]["code"] == "body_too_large", last
                assert last["error"]["request_id"] == "ingest-over"
            else:  # the limit came before the first event: a plain 413
                assert error(r, 413, "body_too_large")["request_id"] == "ingest-over"
        finally:
            c.delete(f"/v1/sessions/{sid}")


def test_log_lines_carry_the_request_id(servers: Servers) -> None:
    with api(servers.cors) as c:
        c.get("/v1/models", headers={"X-Request-ID": "log-ok-1"})
        c.get("/v1/sessions/missing", headers={"X-Request-ID": "log-404-1"})
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True},
               headers={"X-Request-ID": "log-stream-1"})
        replaced = c.get("/health", headers={"X-Request-ID": "not a valid id"}).headers["x-request-id"]
    deadline = time.monotonic() + 5
    while True:  # the access line is written as the answer starts: it may lag the client by a hair
        lines = json_lines(servers.cors)
        ids = {line["request_id"] for line in lines}
        if {"log-ok-1", "log-404-1", "log-stream-1", replaced} <= ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message", "request_id"}, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
    for rid, what in [("log-ok-1", "GET /v1/models"), ("log-404-1", "GET /v1/sessions/missing"),
                      ("log-stream-1", "POST /v1/completions")]:
        mine = [line for line in lines if line["request_id"] == rid]
        access = [line for line in mine if line["logger"] == "uvicorn.access"]
        assert access and all(what in line["message"] for line in access), mine
    # the replaced id is on the line that says so, and on the request's access line
    mine = [line for line in lines if line["request_id"] == replaced]
    assert {line["logger"] for line in mine} == {"atlas.server", "uvicorn.access"}, mine
    assert any("replaced an invalid X-Request-ID" in line["message"] for line in mine)
    # lines outside any request have none
    assert any(line["request_id"] is None and "ready: model" in line["message"] for line in lines)


def test_log_formatters() -> None:
    import logging

    record = logging.LogRecord("atlas.server", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    RequestIdFilter().filter(record)
    assert TextFormatter().format(record) == "INFO:     atlas.server: hello there"
    token = request_id.set("rid-7")
    try:
        record = logging.LogRecord("uvicorn.access", logging.WARNING, __file__, 1, "x", (), None)
        RequestIdFilter().filter(record)
    finally:
        request_id.reset(token)
    assert TextFormatter().format(record) == "WARNING:  [rid-7] uvicorn.access: x"
    out = json.loads(JsonFormatter().format(record))
    got = (out["level"], out["logger"], out["message"], out["request_id"])
    assert got == ("WARNING", "uvicorn.access", "x", "rid-7")


# -- CORS ---------------------------------------------------------------------------------------------

def preflight(c: httpx.Client, path: str, origin: str, method: str = "POST") -> httpx.Response:
    return c.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-request-id"})


def test_preflight_allowed_and_denied(servers: Servers) -> None:
    with api(servers.cors, headers={}) as c:  # no key: a preflight never carries one
        for origin in (ALLOWED, servers.site.origin):
            r = preflight(c, "/v1/completions", origin)
            assert r.status_code == 200, r.text
            assert r.headers["access-control-allow-origin"] == origin
            assert "POST" in r.headers["access-control-allow-methods"]
            allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
            assert {"authorization", "content-type", "x-request-id"} <= allowed
            assert HEX_ID.fullmatch(r.headers["x-request-id"])
        # every method a route takes passes a preflight
        paths = httpx.get(servers.cors.url + "/openapi.json", headers=AUTH).json()["paths"]
        for method in {m.upper() for ops in paths.values() for m in ops}:
            assert preflight(c, "/v1/sessions/abc", ALLOWED, method).status_code == 200, method
        # another origin, or a method the API never takes
        r = preflight(c, "/v1/completions", "http://evil.example")
        assert "access-control-allow-origin" not in r.headers
        assert error(r, 400, "cors_not_allowed")
        assert "origin" in error(preflight(c, "/v1/completions", "http://evil.example"), 400,
                                 "cors_not_allowed")["message"]
        error(preflight(c, "/v1/completions", ALLOWED, "PUT"), 400, "cors_not_allowed")


def test_cors_headers_on_answers_and_errors(servers: Servers) -> None:
    origin = {"Origin": ALLOWED}

    def cors_ok(r: httpx.Response) -> httpx.Response:
        assert r.headers.get("access-control-allow-origin") == ALLOWED, (r.status_code, r.headers)
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "retry-after"} <= exposed
        return r

    with api(servers.cors, headers=origin) as anon, api(servers.cors, {**AUTH, **origin}) as c, \
            api(servers.cors, {"Authorization": "Bearer k-full", **origin}) as full:
        assert cors_ok(c.get("/v1/models")).status_code == 200
        error(cors_ok(anon.get("/v1/sessions")), 401, "unauthorized")
        error(cors_ok(c.get("/v1/nothing-here")), 404, "route_not_found")
        error(cors_ok(c.delete("/v1/completions")), 405, "method_not_allowed")
        made = []
        try:
            for _ in range(MAX_SESSIONS):
                made.append(full.post("/v1/sessions").json()["id"])
            error(cors_ok(full.post("/v1/sessions")), 429, "too_many_sessions")
        finally:
            for sid in made:
                full.delete(f"/v1/sessions/{sid}")
        # a streamed answer
        r = cors_ok(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}))
        assert parse_sse(r.text)[-1] == "[DONE]"
        # an origin not on the list gets no CORS header (its page cannot read the answer)
        r = c.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_is_off_by_default(servers: Servers) -> None:
    with api(servers.plain, headers={"Origin": ALLOWED, **AUTH}) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        r = preflight(c, "/v1/completions", ALLOWED)
        assert "access-control-allow-origin" not in r.headers
        error(r, 405, "method_not_allowed")
        # text logs, with the request id on the request's lines
        c.get("/v1/models", headers={"X-Request-ID": "plain-log-1"})
    deadline = time.monotonic() + 5
    while "[plain-log-1] uvicorn.access:" not in servers.plain.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "[plain-log-1] uvicorn.access:" in servers.plain.log()
    assert "INFO:     atlas.server: ready: model" in servers.plain.log()


# -- tokenize -----------------------------------------------------------------------------------------

def test_tokenize_and_detokenize_round_trip(servers: Servers, fast_checkpoint: Path) -> None:
    atlas = Atlas.load(fast_checkpoint)
    text = "Héllo, wörld ✓ — tokens\n"
    with api(servers.cors) as c:
        r = c.post("/tokenize", json={"prompt": text, "add_special_tokens": True, "model": "fast-atlas"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"count", "max_model_len", "tokens"}
        assert body["tokens"] == atlas.encode(text) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 65536  # ATLAS_MAX_PROMPT_TOKENS: the model has no limit
        # exactly what a completion's prompt is fed as
        done = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
        assert done["usage"]["prompt_tokens"] == body["count"]
        r = c.post("/detokenize", json={"tokens": body["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": text}
        assert atlas.decode(body["tokens"]) == text
        # the chat form: the conversation through the model's template, as chat completions read it
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                 {"type": "text", "text": "there"}]}]
        r = c.post("/tokenize", json={"messages": messages})
        assert r.status_code == 200, r.text
        flat = [messages[0], {"role": "user", "content": "Hi \nthere"}]  # parts: one per line, as vLLM
        rendered = render_chat(flat, atlas.chat_template, atlas.special_tokens)
        assert r.json()["tokens"] == atlas.encode(rendered)
        bare = c.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
        assert bare["count"] < r.json()["count"]
        # the count chat completions report for the same messages
        done = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
        assert done["usage"]["prompt_tokens"] == r.json()["count"]
        # refusals
        vocab = atlas.tokenizer.vocab_size
        err = error(c.post("/detokenize", json={"tokens": [65, vocab]}), 400, "token_out_of_vocabulary")
        assert str(vocab) in err["message"]
        error(c.post("/detokenize", json={"tokens": [-1]}), 400, "token_out_of_vocabulary")
        error(c.post("/detokenize", json={"tokens": ["65"]}), 422, "invalid_request")
        error(c.post("/tokenize", json={"prompt": "a", "messages": messages}), 422, "invalid_request")
        error(c.post("/tokenize", json={}), 422, "invalid_request")
        error(c.post("/tokenize", json={"prompt": "a", "model": "gpt-4"}), 404, "model_not_found")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        error(c.post("/tokenize", content=b"prompt=a", headers=form), 415, "unsupported_media_type")
    with api(servers.cors, headers={}) as anon:
        error(anon.post("/tokenize", json={"prompt": "a"}), 401, "unauthorized")
        error(anon.post("/detokenize", json={"tokens": [1]}), 401, "unauthorized")


# -- routes -------------------------------------------------------------------------------------------

def test_unknown_v1_route_lists_the_served_routes(servers: Servers) -> None:
    with api(servers.cors) as c:
        paths = c.get("/openapi.json").json()["paths"]
        served = {f"{m.upper()} {p}" for p, ops in paths.items() if p.startswith("/v1/") for m in ops}
        assert {"POST /v1/completions", "GET /v1/models", "POST /v1/sessions"} <= served
        for method, path in [("GET", "/v1/complete"), ("POST", "/v1/chat/complete"), ("GET", "/v1"),
                             ("DELETE", "/v1/sessions/a/b/c")]:
            err = error(c.request(method, path), 404, "route_not_found")
            head = f"no route {method} {path}; served routes: POST /v1/completions, "
            assert err["message"].startswith(head), err
            listed = set(err["message"].split("served routes: ", 1)[1].split(", "))
            assert listed == served, listed ^ served
        error(c.get("/not-v1"), 404, "not_found")  # outside /v1: the plain 404
        # a known path with a method it does not take: 405 naming all the ones it does (Starlette's own
        # Allow names only the first route matched at the path: GET /v1/sessions, not POST)
        for method, path, template in [("PUT", "/v1/sessions", "/v1/sessions"),
                                       ("GET", "/v1/completions", "/v1/completions"),
                                       ("POST", "/v1/sessions/abc", "/v1/sessions/{sid}")]:
            r = c.request(method, path)
            takes = {m.upper() for m in paths[template]}
            assert len(takes) >= 1 and method not in takes
            err = error(r, 405, "method_not_allowed")
            assert {m.strip() for m in r.headers["allow"].split(",")} == takes, (r.headers, takes)
            assert all(m in err["message"] for m in takes)
        assert {m.upper() for m in paths["/v1/sessions"]} >= {"GET", "POST"}


def test_new_codes_are_in_the_table() -> None:
    assert STATUS["route_not_found"] == 404 and STATUS["cors_not_allowed"] == 400
    assert STATUS["token_out_of_vocabulary"] == 400


# -- in process: draining, an unhandled exception, settings --------------------------------------------

@pytest.fixture(scope="module")
def app(fast_atlas: Atlas, store) -> FastAPI:
    settings = ServerSettings(api_keys=f"{KEY}:web", cors_origins=ALLOWED)
    app = create_app(settings, atlas=fast_atlas, store=store)

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    return app


def test_draining_and_internal_errors_keep_ids_and_cors(app: FastAPI) -> None:
    headers = {**AUTH, "Origin": ALLOWED, "X-Request-ID": "inproc-1"}
    with TestClient(app, client=("127.0.0.1", 5000), raise_server_exceptions=False) as c:
        r = c.get("/v1/boom", headers=headers)
        assert r.status_code == 500
        assert r.json()["error"] == {"code": "internal_error", "request_id": "inproc-1",
                                     "message": "internal error; see the server log"}
        assert r.headers["x-request-id"] == "inproc-1" and r.headers["access-control-allow-origin"] == ALLOWED
        app.state.draining = True
        try:
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.json()["error"]["request_id"] == "inproc-1" == r.headers["x-request-id"]
            assert r.headers["access-control-allow-origin"] == ALLOWED and r.headers["retry-after"] == "5"
            # a preflight is answered even then (the answer to the call after it says 503)
            r = c.options("/v1/models", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "GET"})
            assert r.status_code == 200
        finally:
            app.state.draining = False


def test_cors_settings() -> None:
    assert ServerSettings().cors_origin_list == []
    assert ServerSettings(cors_origins="*").cors_origin_list == ["*"]
    assert ServerSettings(cors_origins=" https://a.example/ , http://localhost:5173").cors_origin_list == [
        "https://a.example", "http://localhost:5173"]
    # as a browser writes its Origin header: lower case, no default port
    browser_form = ServerSettings(cors_origins="HTTPS://App.Example.com:443,http://a.example:8080")
    assert browser_form.cors_origin_list == ["https://app.example.com", "http://a.example:8080"]
    for bad in ["a.example", "https://a.example/path", "https://", "https://*.example.com", "https://a.com?x=1",
                "https://a.com#f", "https://user@a.com", "https://a.com:99999", "[/https://a.com]"]:
        with pytest.raises(ValueError, match="ATLAS_CORS_ORIGINS"):
            ServerSettings(cors_origins=bad)
    # API keys: every entry KEY:TENANT, the tenant one the store can hold, no key twice
    assert ServerSettings(api_keys="k1:acme, k2").tenants_by_key == {"k1": "acme", "k2": "default"}
    for bad in ["sk-x:ten ant", "sk-x:acme,sk-x:globex", "k1:a;k2:b", "clé:uni", "k:t{x}", ":acme"]:
        with pytest.raises(ValueError, match="ATLAS_API_KEYS"):
            ServerSettings(api_keys=bad)
    assert ServerSettings(log_format="JSON").log_format == "json"
    with pytest.raises(ValueError):
        ServerSettings(log_format="xml")


def test_any_origin(fast_atlas: Atlas, store) -> None:
    app = create_app(ServerSettings(api_keys=f"{KEY}:web", cors_origins="*"), atlas=fast_atlas, store=store)
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        r = c.options("/tokenize", headers={
            "Origin": "http://anything.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, X-Stainless-Os"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
        r = c.post("/tokenize", json={"prompt": "ab"}, headers={**AUTH, "Origin": "http://anything.example"})
        assert r.json()["tokens"] == [97, 98] and r.headers["access-control-allow-origin"] == "*"


# -- a real browser -----------------------------------------------------------------------------------

def run_page(site: StaticSite, srv: ServerProcess) -> tuple[dict, list[str]]:
    """Open the page against ``srv`` in headless Chromium; its results and console messages."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    console: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # a fresh profile each launch
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(m.text))
            page.goto(f"{site.origin}/page.html?api={srv.url}&key={KEY}")
            page.wait_for_function("window.__done === true", timeout=30_000)
            return page.evaluate("window.__results"), console
        finally:
            browser.close()


def test_browser_page_from_another_origin(servers: Servers) -> None:
    results, console = run_page(servers.site, servers.cors)
    assert results["models"] == {"status": 200, "model": "fast-atlas", "request_id": "page-models-1"}, results
    unauthorized = results["unauthorized"]
    assert unauthorized["status"] == 401 and unauthorized["code"] == "unauthorized", results
    assert unauthorized["request_id"] == unauthorized["body_id"]
    assert HEX_ID.fullmatch(unauthorized["request_id"])
    tok = results["tokenize"]
    assert tok["status"] == 200 and tok["request_id"] == "page-tok-1"
    assert tok["tokens"] == list("héllo".encode())
    assert results["session"]["status"] == 201, results
    stream = results["stream"]
    assert stream["status"] == 200 and stream["type"].startswith("text/event-stream"), results
    assert stream["tokens"] == 24 and stream["last"]["done"] is True and stream["reads"] >= 1, results
    assert HEX_ID.fullmatch(stream["request_id"])
    assert results["delete"] == {"status": 204}, results
    # CORS off: the browser refuses to hand the page any answer, the preflighted calls never leave
    results, console = run_page(servers.site, servers.plain)
    for step in ("models", "unauthorized", "tokenize", "session", "stream", "delete"):
        assert "Failed to fetch" in results[step].get("failed", ""), (step, results)
    assert any("CORS policy" in line for line in console), console


# -- the SDK's and the command line's chat ---------------------------------------------------------------

@pytest.fixture
def chat_session(servers: Servers) -> Iterator[str]:
    """A session holding a short document, deleted afterwards."""
    with AtlasClient(servers.cors.url, KEY) as c:
        sid = c.ingest(document(3000)).session_id
        yield sid
        c.delete_session(sid)


def greedy(n: int = 12) -> dict:
    return {"max_tokens": n, "temperature": 0}


def test_sdk_chat_streams_and_answers_whole(servers: Servers, chat_session: str) -> None:
    sid = chat_session
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    with AtlasClient(servers.cors.url, KEY) as c, api(servers.cors) as raw:
        before = c.get_session(sid)
        stream = c.chat(msgs, session_id=sid, **greedy())
        streamed = [t.text for t in stream]
        assert stream.done is not None and stream.done.finish_reason == "length"
        assert stream.done.usage is not None and stream.done.usage.completion_tokens == 12
        whole = c.chat(msgs, session_id=sid, stream=False, **greedy())
        assert isinstance(whole, ChatCompletion) and whole.finish_reason == "length"
        assert whole.text == "".join(streamed) and whole.usage is not None
        assert whole.usage.prompt_tokens == stream.done.usage.prompt_tokens
        # the route's own answer, in OpenAI's shape, is the same
        body = raw.post("/v1/chat/completions", json={"messages": msgs, "session_id": sid, **greedy()}).json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == whole.text
        # the session was read (another answer without it), and not changed
        alone = c.chat(msgs, stream=False, **greedy())
        assert alone.usage is not None and alone.usage.prompt_tokens == whole.usage.prompt_tokens
        assert c.get_session(sid).tokens == before.tokens
        # commit: the turn and the answer are appended to the session
        committed = c.chat(msgs, session_id=sid, commit=True, stream=False, **greedy())
        assert committed.text == whole.text
        assert c.get_session(sid).tokens == before.tokens + committed.usage.total_tokens  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            c.chat(msgs, session_id="0" * 32, stream=False)
        with pytest.raises(NotFound):
            list(c.chat(msgs, session_id="0" * 32))

    async def both() -> tuple[str, str]:
        async with AsyncAtlasClient(servers.cors.url, KEY) as ac:
            pieces = [t.text async for t in ac.chat(msgs, session_id=sid, **greedy())]
            answer = await ac.chat(msgs, session_id=sid, stream=False, **greedy())
            return "".join(pieces), answer.text

    # the session now holds the committed turn: both faces agree on the new answer
    streamed_async, whole_async = asyncio.run(both())
    with AtlasClient(servers.cors.url, KEY) as c:
        assert streamed_async == whole_async == c.chat(msgs, session_id=sid, stream=False, **greedy()).text


def prompt_tokens_total(srv: ServerProcess) -> float:
    """The server's count of prompt tokens read so far (/metrics): what a command sent, measured."""
    text = httpx.get(srv.url + "/metrics", headers=AUTH).text
    return float(re.search(r"^atlas:prompt_tokens_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_cli_chat_keeps_the_conversation(servers: Servers, chat_session: str) -> None:
    """``atlas chat`` sends the whole conversation each turn (and the session stays as it was), or with
    --commit only the new turn. The tiny model's answers hardly depend on what it read, so what was
    sent is measured by the server's prompt token count, against the SDK sending what it should."""
    sid = chat_session
    env = {"ATLAS_URL": servers.cors.url, "ATLAS_API_KEY": KEY}
    args = ["chat", sid, "--system", "Be brief.", "-n", "10", "-t", "0"]
    system = {"role": "system", "content": "Be brief."}
    with AtlasClient(servers.cors.url, KEY) as c:
        before = c.get_session(sid).tokens
        sent = prompt_tokens_total(servers.cors)
        r = CliRunner().invoke(atlas_app, args, env=env, input="hi\n\nbye\n")  # a blank line is no turn
        assert r.exit_code == 0, r.output
        cli_sent, sent = prompt_tokens_total(servers.cors) - sent, prompt_tokens_total(servers.cors)
        history = [system, {"role": "user", "content": "hi"}]
        first = c.chat(history, session_id=sid, stream=False, **greedy(10)).text
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "bye"}]
        second = c.chat(history, session_id=sid, stream=False, **greedy(10)).text
        assert r.stdout == f"{first}\n{second}\n"
        assert cli_sent == prompt_tokens_total(servers.cors) - sent > 0
        assert c.get_session(sid).tokens == before  # no --commit: the session is as it was

        # --commit, through a real pipe (the client distribution's own command): each turn and answer
        # are appended, and the second request carries only the new turn. The same, done with the SDK
        # on a copy of the session, is the reference.
        copy = c.fork(sid).id
        try:
            sent = prompt_tokens_total(servers.cors)
            first = c.chat([system, {"role": "user", "content": "hi"}], session_id=copy, commit=True,
                           stream=False, **greedy(10)).text
            second = c.chat([{"role": "user", "content": "bye"}], session_id=copy, commit=True, stream=False,
                            **greedy(10)).text
            sdk_sent = prompt_tokens_total(servers.cors) - sent
            expected_tokens = c.get_session(copy).tokens
        finally:
            c.delete_session(copy)
        sent = prompt_tokens_total(servers.cors)
        proc = subprocess.run([sys.executable, "-m", "atlas_client", *args, "--commit"], input=b"hi\nbye\n",
                              capture_output=True, env={**os.environ, **env}, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode() == f"{first}\n{second}\n"
        assert prompt_tokens_total(servers.cors) - sent == sdk_sent < cli_sent
        assert c.get_session(sid).tokens == expected_tokens > before
