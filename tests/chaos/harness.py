"""What the chaos tests share: an HTTP client that counts every answer into the table, paced
uploads, the stored state read straight from Redis, and the comparison with a reference run."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import torch

from atlas.engine import Atlas
from atlas.engine.state import is_cache_key
from atlas.engine.store import StoreSettings, connect
from atlas.engine.store.redis_store import RedisStore
from bench.server_process import ServerProcess

from ..server_helpers import parse_sse
from .table import ClassCounts

GREEDY: dict[str, Any] = {"prompt": "\nROMEO:", "max_tokens": 16, "temperature": 0}
TEXT = {"Content-Type": "text/plain"}


@dataclass
class Answer:
    """One answer: its status, the error code (of the body, or of a stream's last event) and, for a
    stream, its events."""

    status: int
    code: str | None
    events: list[Any]
    body: Any = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)

    @property
    def ok(self) -> bool:
        return self.status < 300 and self.code is None

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1] if self.events and isinstance(self.events[-1], dict) else {}


class Probe:
    """An httpx client that records every answer in `counts`: 503 store_unavailable apart, any other
    5xx (a 500 above all) as a failure, with a note naming the request."""

    def __init__(self, url: str, counts: ClassCounts, headers: dict[str, str] | None = None,
                 timeout: float = 60) -> None:
        self.counts = counts
        self.http = httpx.Client(base_url=url, headers=headers or {}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, what: str, r: httpx.Response) -> Answer:
        events: list[Any] = []
        body: Any = None
        code: str | None = None
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            events = parse_sse(r.text)
            last = events[-1] if events else None
            if isinstance(last, dict) and "error" in last:
                code = last["error"]["code"]
        elif r.content:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            if r.status_code >= 400 and isinstance(body, dict) and "error" in body:
                code = body["error"].get("code")
        status = r.status_code
        self.count(what, status, code, body if body is not None else (events[-1:] or None))
        return Answer(status, code, events, body, r.headers)

    def count(self, what: str, status: int, code: str | None, detail: Any = None) -> None:
        self.counts.add(requests=1)
        # An error event in a stream that had started (HTTP 200) counts as the status it stands for.
        if code == "store_unavailable":
            self.counts.add(unavailable_503=1)
        elif status >= 500 or code in ("internal_error",):
            self.counts.add(errors_5xx=1)
            self.counts.note(f"{what}: {status} {code} {str(detail)[:200]}")

    def request(self, method: str, path: str, **kw: Any) -> Answer:
        return self._record(f"{method} {path.split('?')[0]}", self.http.request(method, path, **kw))

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Answer:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> Answer:
        return self.request("DELETE", path, **kw)

    # -- the session routes ---------------------------------------------------------------------

    def create(self) -> str:
        a = self.post("/v1/sessions")
        assert a.status == 201, a
        return str(a.body["id"])

    def meta(self, sid: str) -> Answer:
        return self.get(f"/v1/sessions/{sid}")

    def ingest(self, sid: str, data: Any, offset: int | None = None) -> Answer:
        params = {} if offset is None else {"offset": offset}
        return self.post(f"/v1/sessions/{sid}/ingest", params=params, content=data, headers=TEXT)

    def generate(self, sid: str, **body: Any) -> Answer:
        return self.post(f"/v1/sessions/{sid}/generate", json={**GREEDY, **body})


def tokens_of(a: Answer) -> list[int]:
    return [e["token"] for e in a.events if isinstance(e, dict) and "token" in e]


def paced(data: bytes, size: int, delay_s: float) -> Iterator[bytes]:
    """An upload at a client's pace, so that a fault lands in the middle of it."""
    for i in range(0, len(data), size):
        time.sleep(delay_s)
        yield data[i:i + size]


def resume(p: Probe, sid: str, doc: bytes, counts: ClassCounts, limit_s: float = 60) -> Answer:
    """Resume an upload from the session's `bytes_committed` until it is done; a lease still held by
    the dead writer (409 lease_conflict) or a store not back yet (503) is waited out and the wait
    recorded."""
    t0 = time.monotonic()
    while True:
        m = p.meta(sid)
        if m.ok:
            done = int(m.body["bytes_committed"])
            tried = time.monotonic()
            a = p.ingest(sid, doc[done:], offset=done)
            if a.ok and a.last.get("done"):
                counts.waited(tried - t0)  # the wait before the resume was let in, not its upload
                return a
            assert a.code in ("lease_conflict", "store_unavailable"), a
            if a.code == "lease_conflict":
                assert int(a.headers.get("retry-after", "0")) >= 1, a  # tells the client when to come back
                counts.add(lease_409=1)
        else:
            assert m.code == "store_unavailable", m
        assert time.monotonic() - t0 < limit_s, f"no resume in {limit_s}s: {m}"
        time.sleep(0.1)


def store_for(url: str, state_key: str | None = None) -> RedisStore:
    """A store on the server's Redis (a unix socket for the embedded one), to read states raw."""
    return RedisStore(connect(url, timeout_s=10), StoreSettings(redis_url=url, state_key=state_key))


def stored_state(url: str, sid: str, state_key: str | None = None) -> bytes:
    store = store_for(url, state_key)
    try:
        return store.get(sid)[0]
    finally:
        store.close()


def same_state(atlas: Atlas, got: bytes, ref: bytes) -> bool:
    """Bit for bit; else (a stream that ends inside a chunk keeps last logits whose rounding depends
    on how the upload was cut) every recurrent tensor bit for bit and the last logits within fp32
    rounding, as the streaming-invariance guarantee says."""
    if got == ref:
        return True
    a, b = atlas.load_state(got), atlas.load_state(ref)
    if a.tensors.keys() != b.tensors.keys():
        return False
    for k, v in b.tensors.items():
        if is_cache_key(k):
            continue
        w = a.tensors[k]
        ok = torch.allclose(w, v, rtol=1e-5, atol=1e-6) if k == "last_logits" else torch.equal(w, v)
        if not ok:
            return False
    return True


def alive(srv: ServerProcess) -> bool:
    if srv.proc is None or srv.proc.poll() is not None:
        return False
    try:
        return httpx.get(srv.url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def embedded_url(data_dir: os.PathLike[str] | str) -> str:
    return f"unix://{os.fspath(data_dir)}/redis.sock"


def index_leak(store_url: str, p: Probe, tenant: str) -> int:
    """Ids in the tenant's index (what the cap counts) beyond the sessions it lists: places a crash
    would have taken from the tenant for good."""
    raw = redis.Redis.from_url(store_url, socket_timeout=10)
    try:
        indexed = int(raw.scard(f"atlas:tenant:{{{tenant}}}"))  # the key layout of redis_store.py
    finally:
        raw.close()
    listed = p.get("/v1/sessions")
    assert listed.ok, listed
    return indexed - len(listed.body["data"])
