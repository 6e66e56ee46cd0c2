"""Classes 1, 2 and 7: processes killed in the middle of an upload.

1. ``kill -9`` of ``atlas serve`` (every other time with its embedded redis-server too), restart,
   resume from ``bytes_committed``;
2. ``kill -9`` of an external redis-server (AOF, fsync always) under a running server, start it again
   on the same files and port, resume;
7. ``kill -9`` of the embedded store's redis-server under a running server: its supervisor starts it
   again by itself.

Each resumed session must equal an uninterrupted ingest of the same document, and nothing the store
acknowledged as committed may be missing after the fault.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from atlas.engine import Atlas
from bench.server_process import ServerProcess

from ..helpers import document
from ..server_helpers import kill_embedded_redis, stop_embedded_redis
from ..store_helpers import RedisServer
from . import table
from .harness import Probe, alive, embedded_url, index_leak, resume, same_state, stored_state, tokens_of
from .table import ClassCounts

DOC = document(300_000)
PIECE, PACE_S = 8192, 0.006  # ~0.25 s per upload: a fault at a random moment lands inside it
UPLOAD_S = len(DOC) / PIECE * PACE_S
SERVER_ENV = {"ATLAS_CHECKPOINT_TOKENS": "8192",  # many commits per upload: most faults land between two
              "ATLAS_INGEST_CHUNKS_PER_STEP": "1", "ATLAS_PROGRESS_INTERVAL_S": "0.05"}


class Reference:
    """An uninterrupted ingest of DOC on the same server: its stored state and greedy continuation."""

    def __init__(self, p: Probe, store_url: str) -> None:
        self.sid = p.create()
        a = p.ingest(self.sid, DOC)
        assert a.ok and a.last["bytes_committed"] == len(DOC), a
        self.state = stored_state(store_url, self.sid)
        self.tokens = tokens_of(p.generate(self.sid))
        assert len(self.tokens) == 16

    def check(self, p: Probe, store_url: str, atlas: Atlas, sid: str, counts: ClassCounts) -> None:
        m = p.meta(sid).body
        got = stored_state(store_url, sid)
        toks = tokens_of(p.generate(sid))
        counters = (m["bytes_committed"], m["tokens"])
        if counters != (len(DOC), len(DOC)) or not same_state(atlas, got, self.state) or toks != self.tokens:
            counts.add(wrong=1)
            counts.note(f"session {sid} differs from the reference: {m}")


def upload_with_fault(url: str, sid: str, counts: ClassCounts, fault: Callable[[], None],
                      delay_s: float) -> int:
    """Upload DOC at a client's pace and run `fault` after `delay_s`; meanwhile read the session's
    `bytes_committed` every 20 ms. Returns the most bytes acknowledged as committed before the fault
    (by those reads or by a done event)."""
    acked = 0
    stop = threading.Event()
    lock = threading.Lock()

    def ack(n: int) -> None:
        nonlocal acked
        with lock:
            acked = max(acked, n)

    def upload() -> None:
        with Probe(url, counts) as p:
            try:
                a = p.ingest(sid, _paced_until(stop), offset=0)
            except httpx.HTTPError:
                counts.add(requests=1)  # the server died under it
                return
            if a.ok and a.last.get("done"):
                ack(int(a.last["bytes_committed"]))

    def poll() -> None:
        with Probe(url, counts, timeout=10) as p:
            while not stop.is_set():
                try:
                    m = p.meta(sid)
                except httpx.HTTPError:
                    counts.add(requests=1)
                    time.sleep(0.02)
                    continue
                if m.ok and not faulted.is_set():
                    ack(int(m.body["bytes_committed"]))
                time.sleep(0.02)

    faulted = threading.Event()
    threads = [threading.Thread(target=upload), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    time.sleep(delay_s)
    with lock:
        faulted.set()  # acknowledgements read from now on may come after the fault: not counted
    fault()
    counts.add(faults=1)
    threads[0].join(60)
    stop.set()
    threads[1].join(60)
    return acked


def _paced_until(stop: threading.Event) -> Iterator[bytes]:
    """DOC at a client's pace, until the fault's aftermath stops it."""
    for i in range(0, len(DOC), PIECE):
        if stop.is_set():
            return
        time.sleep(PACE_S)
        yield DOC[i:i + PIECE]


def _lost(p: Probe, sid: str, acked: int, counts: ClassCounts) -> int:
    """Count acknowledged bytes missing after the fault; 1 when the fault cut the upload short."""
    m = p.meta(sid)
    assert m.ok, m
    missing = max(0, acked - int(m.body["bytes_committed"]))
    if missing:
        counts.add(lost_bytes=missing)
        counts.note(f"session {sid}: {acked} acknowledged, {m.body['bytes_committed']} after the fault")
    return int(m.body["bytes_committed"] < len(DOC))


def _landed(counts: ClassCounts, mid: int, n: int) -> None:
    counts.note(f"{mid} of {n} faults cut an upload short (the others came after it was done)")


Served = tuple[ServerProcess, Reference]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, fast_checkpoint: Path) -> Iterator[Served]:
    """A server on the embedded store (the default), shared by classes 1 and 7, with its reference."""
    work = tmp_path_factory.mktemp("embedded")
    srv = ServerProcess(work, {"ATLAS_MODEL": str(fast_checkpoint), **SERVER_ENV})
    try:
        srv.start()
        with Probe(srv.url, ClassCounts("setup", "-")) as p:
            ref = Reference(p, embedded_url(work / "data"))
        yield srv, ref
    finally:
        srv.kill()
        stop_embedded_redis(work / "data")


# -- 1. kill -9 of the server -----------------------------------------------------------------------

def kill_server_mid_ingest(embedded: Served, atlas: Atlas, n: int, size: str) -> None:
    counts = table.counts("1. kill -9 server mid-ingest", size)
    rng = random.Random(1)
    srv, ref = embedded
    data = srv.workdir / "data"
    url = embedded_url(data)
    mid = 0
    try:
        for i in range(n):
            with Probe(srv.url, counts) as p:
                sid = p.create()
            with_redis = i % 2 == 1  # every other time the machine "crashes": the Redis dies too

            def fault(with_redis: bool = with_redis) -> None:
                srv.kill()
                if with_redis:
                    kill_embedded_redis(data)

            acked = upload_with_fault(srv.url, sid, counts, fault, rng.uniform(0.02, UPLOAD_S))
            srv.start()
            with Probe(srv.url, counts) as p:
                mid += _lost(p, sid, acked, counts)
                resume(p, sid, DOC, counts)  # the lease of the dead runtime: waited out and timed
                ref.check(p, url, atlas, sid, counts)
                assert p.delete(f"/v1/sessions/{sid}").status == 204
        assert alive(srv)
        _landed(counts, mid, n)
    finally:
        table.finish(counts)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes


def test_kill_server_mid_ingest(embedded: Served, fast_model: Atlas) -> None:
    kill_server_mid_ingest(embedded, fast_model, 2, "short")


@pytest.mark.slow
def test_kill_server_mid_ingest_full(embedded: Served, fast_model: Atlas) -> None:
    kill_server_mid_ingest(embedded, fast_model, 20, "full")


# -- 2. kill -9 of an external Redis -----------------------------------------------------------------

def kill_redis_mid_ingest(tmp_path: Path, checkpoint: Path, atlas: Atlas, n: int, size: str) -> None:
    counts = table.counts("2. kill -9 Redis mid-ingest", size)
    rng = random.Random(2)
    redis = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    srv = ServerProcess(tmp_path, {"ATLAS_MODEL": str(checkpoint), "ATLAS_REDIS_URL": redis.url,
                                   "ATLAS_SOCKET_TIMEOUT_S": "2", **SERVER_ENV})
    mid = 0
    try:
        srv.start()
        with Probe(srv.url, counts) as p:
            ref = Reference(p, redis.url)
        for _ in range(n):
            with Probe(srv.url, counts) as p:
                sid = p.create()
            def fault() -> None:
                redis.kill()
                time.sleep(rng.uniform(0.1, 1.0))  # the outage: requests meanwhile get 503
                redis.start()

            acked = upload_with_fault(srv.url, sid, counts, fault, rng.uniform(0.02, UPLOAD_S))
            with Probe(srv.url, counts) as p:
                mid += _lost(p, sid, acked, counts)
                resume(p, sid, DOC, counts)
                ref.check(p, redis.url, atlas, sid, counts)
                assert p.delete(f"/v1/sessions/{sid}").status == 204
        with Probe(srv.url, counts) as p:
            leaked = index_leak(redis.url, p, "default")
        if leaked:
            counts.add(wrong=1)
            counts.note(f"{leaked} ids in the tenant's index without a session (cap places lost)")
        assert alive(srv)
        _landed(counts, mid, n)
    finally:
        table.finish(counts)
        srv.kill()
        redis.kill()
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes


def test_kill_redis_mid_ingest(tmp_path: Path, fast_checkpoint: Path, fast_model: Atlas) -> None:
    kill_redis_mid_ingest(tmp_path, fast_checkpoint, fast_model, 2, "short")


@pytest.mark.slow
def test_kill_redis_mid_ingest_full(tmp_path: Path, fast_checkpoint: Path, fast_model: Atlas) -> None:
    kill_redis_mid_ingest(tmp_path, fast_checkpoint, fast_model, 20, "full")


# -- 7. the embedded Redis killed under a running server ---------------------------------------------

def kill_embedded_redis_under_server(embedded: Served, atlas: Atlas, n: int,
                                     size: str) -> None:
    counts = table.counts("7. embedded Redis killed", size)
    rng = random.Random(7)
    srv, ref = embedded
    data = srv.workdir / "data"
    url = embedded_url(data)
    keep = [ref.sid]  # sessions that must come through every restart unchanged
    mid = 0
    try:
        for _ in range(n):
            with Probe(srv.url, counts) as p:
                sid = p.create()
                before = [p.meta(s).body for s in keep]
            killed: list[float] = []

            def fault(killed: list[float] = killed) -> None:
                assert kill_embedded_redis(data) is not None
                killed.append(time.monotonic())

            acked = upload_with_fault(srv.url, sid, counts, fault, rng.uniform(0.02, UPLOAD_S))
            with Probe(srv.url, counts) as p:
                while not p.meta(sid).ok:  # the supervisor restarts it; 503 meanwhile
                    assert time.monotonic() - killed[0] < 20, "the embedded redis did not come back"
                    time.sleep(0.05)
                counts.waited(time.monotonic() - killed[0])
                mid += _lost(p, sid, acked, counts)
                resume(p, sid, DOC, counts)
                ref.check(p, url, atlas, sid, counts)
                after = [p.meta(s).body for s in keep]
                if after != before:
                    counts.add(wrong=1)
                    counts.note(f"sessions changed across the restart: {before} -> {after}")
                keep.append(sid)
        with Probe(srv.url, counts) as p:
            for s in keep:
                ref.check(p, url, atlas, s, counts)
        assert alive(srv)
        _landed(counts, mid, n)
    finally:
        table.finish(counts)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes


def test_kill_embedded_redis(embedded: Served, fast_model: Atlas) -> None:
    kill_embedded_redis_under_server(embedded, fast_model, 2, "short")


@pytest.mark.slow
def test_kill_embedded_redis_full(embedded: Served, fast_model: Atlas) -> None:
    kill_embedded_redis_under_server(embedded, fast_model, 10, "full")
