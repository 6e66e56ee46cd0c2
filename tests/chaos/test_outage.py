"""Classes 5 and 6, on a server with an external Redis (AOF, fsync always), a 1 s socket timeout and
a cap of 8 sessions per tenant.

5. Many clients create and fork at once, and churn (create, delete) at once, against the cap: the
   tenant never holds more sessions than the cap, in the store's index or in any listing.
6. Redis frozen (SIGSTOP for longer than the socket timeout, then SIGCONT) and stopped (SIGTERM,
   started again) while clients read, generate and ingest: every request answers within the timeout
   and some slack (503 ``store_unavailable`` during the fault), none hangs, none is a 500; afterwards
   everything works, every acknowledged byte is there and every session equals its reference.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis

from atlas.engine import Atlas
from atlas.engine.store import StoreUnavailableError
from bench.server_process import ServerProcess

from ..helpers import document
from ..store_helpers import RedisServer
from . import table
from .harness import Answer, Probe, alive, index_leak, paced, resume, same_state, stored_state, tokens_of
from .table import ClassCounts

CAP = 8
TIMEOUT_S = 1.0
#: What a request may take beyond the socket timeout during a fault: one more store call's worth
#: and the scheduling of a loaded 2-core machine.
SLACK_S = 3.0
OPS = {"Authorization": "Bearer k-ops"}
RACE = {"Authorization": "Bearer k-race"}
DOC = document(120_000)
PIECE = 12_000


class Env:
    def __init__(self, srv: ServerProcess, rs: RedisServer) -> None:
        self.srv, self.redis = srv, rs


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fast_checkpoint: Path) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("outage")
    rs = RedisServer(work / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    srv = ServerProcess(work, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_REDIS_URL": rs.url,
                               "ATLAS_SOCKET_TIMEOUT_S": str(TIMEOUT_S),
                               "ATLAS_MAX_SESSIONS_PER_TENANT": str(CAP),
                               "ATLAS_API_KEYS": "k-ops:ops,k-race:race",
                               "ATLAS_CHECKPOINT_TOKENS": "8192", "ATLAS_INGEST_CHUNKS_PER_STEP": "1"})
    try:
        srv.start()
        yield Env(srv, rs)
    finally:
        srv.kill()
        rs.kill()


# -- 5. the per-tenant cap under concurrent creates and forks -----------------------------------------

def cap_races(e: Env, rounds: int, clients: int, size: str) -> None:
    counts = table.counts("5. create/fork races vs cap", size)
    raw = redis.Redis(port=e.redis.port)
    index = "atlas:tenant:{race}"
    seen: list[int] = []
    stop = threading.Event()

    def monitor() -> None:
        """The tenant's size, as the store's index and as a listing say, all through the races."""
        with Probe(e.srv.url, counts, RACE) as p:
            while not stop.is_set():
                seen.append(int(raw.scard(index)))
                listed = p.get("/v1/sessions")
                if listed.ok:
                    seen.append(len(listed.body["data"]))

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        for r in range(rounds):
            with Probe(e.srv.url, counts, RACE) as p:
                for s in p.get("/v1/sessions").body["data"]:
                    assert p.delete(f"/v1/sessions/{s['id']}").status == 204
                seeds = [p.create() for _ in range(2)]
                for sid in seeds:
                    assert p.ingest(sid, DOC[:5000 * (r % 3 + 1)]).ok
            barrier = threading.Barrier(clients)

            def racer(i: int, seeds: list[str] = seeds, barrier: threading.Barrier = barrier) -> list[Answer]:
                with Probe(e.srv.url, counts, RACE) as q:
                    barrier.wait()
                    first = q.post("/v1/sessions") if i % 2 else q.post(f"/v1/sessions/{seeds[i % 2]}/fork")
                    out = [first]
                    barrier.wait()
                    # churn: free a place and race for it again
                    for _ in range(3):
                        if out[-1].status == 201:
                            q.delete(f"/v1/sessions/{out[-1].body['id']}")
                        out.append(q.post("/v1/sessions") if i % 2 else
                                   q.post(f"/v1/sessions/{seeds[i % 2]}/fork"))
                    return out

            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(racer, range(clients)))
            counts.add(faults=1)
            first = [a[0] for a in answers]
            made = sum(a.status == 201 for a in first)
            if made > CAP - len(seeds):
                counts.add(wrong=made - (CAP - len(seeds)))
                counts.note(f"round {r}: {made} creates admitted beside {len(seeds)} sessions, cap {CAP}")
            for a in (x for per in answers for x in per):
                if a.status not in (201, 429) or (a.status == 429 and a.code != "too_many_sessions"):
                    counts.note(f"round {r}: {a.status} {a.code}")
            if made < CAP - len(seeds):
                counts.note(f"round {r}: only {made} of {CAP - len(seeds)} free places were taken")
            with Probe(e.srv.url, counts, RACE) as p:
                leaked = index_leak(e.redis.url, p, "race")
            if leaked:
                counts.add(wrong=1)
                counts.note(f"round {r}: {leaked} ids in the index without a session (cap places lost)")
    finally:
        stop.set()
        watcher.join()
        raw.close()
        table.finish(counts)
    over = [n for n in seen if n > CAP]
    if over:
        counts.add(wrong=len(over))
        counts.note(f"the tenant held {max(over)} sessions, cap {CAP}")
    assert alive(e.srv)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes
    assert seen and max(seen) <= CAP


def test_cap_races(env: Env) -> None:
    cap_races(env, 2, 16, "short")


@pytest.mark.slow
def test_cap_races_full(env: Env) -> None:
    cap_races(env, 20, 24, "full")


# -- 6. Redis frozen and stopped under load ------------------------------------------------------------

class Load:
    """Clients that read, generate and ingest until told to stop, timing every answer."""

    def __init__(self, e: Env, counts: ClassCounts, atlas: Atlas, ref_state: bytes) -> None:
        self.e, self.counts, self.atlas, self.ref_state = e, counts, atlas, ref_state
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float, str, int]] = []  # start, seconds, what, status
        self.acked: dict[str, int] = {}
        self.finished: list[str] = []

    def timed(self, what: str, call: Callable[[], Answer]) -> Answer | None:
        t0 = time.monotonic()
        try:
            a: Answer | None = call()
        except httpx.HTTPError as err:  # a timeout of the client: a hang
            self.counts.add(requests=1, errors_5xx=1)
            self.counts.note(f"{what}: no answer ({type(err).__name__})")
            a = None
        with self.lock:
            self.latencies.append((t0, time.monotonic() - t0, what, a.status if a else 0))
        return a

    def reader(self, sid: str, ref: list[int]) -> None:
        with Probe(self.e.srv.url, self.counts, OPS, timeout=60) as p:
            while not self.stop.is_set():
                self.timed("GET session", lambda: p.meta(sid))
                g = self.timed("generate", lambda: p.generate(sid))
                if g is not None and g.ok and tokens_of(g) != ref:
                    self.counts.add(wrong=1)
                    self.counts.note(f"generate {sid}: {tokens_of(g)} != {ref}")
                time.sleep(0.02)

    def check(self, p: Probe, sid: str) -> None:
        """A session that has read DOC, across faults: it must equal the uninterrupted reference."""
        deadline = time.monotonic() + 30
        while True:  # Redis may be down or frozen right now: read once it answers
            try:
                state = stored_state(self.e.redis.url, sid)
                break
            except StoreUnavailableError:
                assert time.monotonic() < deadline, "Redis did not come back"
                time.sleep(0.1)
        if not same_state(self.atlas, state, self.ref_state):
            self.counts.add(wrong=1)
            self.counts.note(f"writer session {sid} differs from the reference")
        self.finished.append(sid)
        while p.delete(f"/v1/sessions/{sid}").status != 204:
            assert time.monotonic() < deadline, "the session could not be deleted"
            time.sleep(0.1)

    def writer(self) -> None:
        """Ingest DOC in appended pieces into a session, then again into a new one, and so on."""
        with Probe(self.e.srv.url, self.counts, OPS, timeout=60) as p:
            sid: str | None = None
            while not self.stop.is_set():
                if sid is None:
                    made = self.timed("create", lambda: p.post("/v1/sessions"))
                    if made is None or made.status != 201:
                        time.sleep(0.1)
                        continue
                    sid = str(made.body["id"])
                    self.acked[sid] = 0
                m = self.timed("GET session", partial(p.meta, sid))
                if m is None or not m.ok:
                    time.sleep(0.05)
                    continue
                done = int(m.body["bytes_committed"])
                if done < self.acked[sid]:
                    self.counts.add(lost_bytes=self.acked[sid] - done)
                    self.counts.note(f"{sid}: {self.acked[sid]} acknowledged, {done} read")
                if done == len(DOC):  # checked now and deleted, so that the tenant stays under the cap
                    self.check(p, sid)
                    sid = None
                    continue
                a = self.timed("ingest", partial(p.ingest, sid, DOC[done:done + PIECE], offset=done))
                if a is not None and a.ok and a.last.get("done"):
                    self.acked[sid] = max(self.acked[sid], int(a.last["bytes_committed"]))


def redis_faults(e: Env, atlas: Atlas, freezes: int, stops: int, size: str) -> None:
    counts = table.counts("6. Redis frozen / stopped", size)
    with Probe(e.srv.url, counts, OPS) as p:
        ref_sid = p.create()
        assert p.ingest(ref_sid, DOC).ok
        load = Load(e, counts, atlas, stored_state(e.redis.url, ref_sid))
        readers = []
        for i in range(2):
            sid = p.create()
            assert p.ingest(sid, DOC[: 20_000 + 5_000 * i]).ok
            readers.append((sid, tokens_of(p.generate(sid)), p.meta(sid).body))
    threads = [threading.Thread(target=load.reader, args=(sid, ref)) for sid, ref, _ in readers]
    threads += [threading.Thread(target=load.writer) for _ in range(2)]
    windows: list[tuple[float, float]] = []
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        kinds = ["freeze"] * freezes + ["stop"] * stops
        for kind in kinds:
            t0 = time.monotonic()
            if kind == "freeze":
                assert e.redis.proc is not None
                os.kill(e.redis.proc.pid, signal.SIGSTOP)
                time.sleep(TIMEOUT_S + 1.5)
                os.kill(e.redis.proc.pid, signal.SIGCONT)
            else:
                e.redis.stop()  # SIGTERM: Redis fsyncs and exits
                time.sleep(1.5)
                e.redis.start()
            t1 = time.monotonic()
            windows.append((t0, t1))
            counts.add(faults=1)
            # Recovered: the first answer from the store after the fault.
            with Probe(e.srv.url, counts, OPS) as p:
                while not p.meta(readers[0][0]).ok:
                    assert time.monotonic() - t1 < 30, "the server did not recover"
                    time.sleep(0.05)
            counts.waited(time.monotonic() - t1)
            time.sleep(1.0)
    finally:
        load.stop.set()
        for t in threads:
            t.join(120)
        table.finish(counts)
    slowest = max((s, what, st) for t0, s, what, st in load.latencies)
    counts.answered(slowest[0])
    for s, what, st in sorted(((s, w, st) for _, s, w, st in load.latencies), reverse=True)[:3]:
        counts.note(f"slow answer: {s:.2f}s, {what} ({st})")
    with Probe(e.srv.url, counts, OPS) as p:
        for sid, ref, meta in readers:  # unchanged by all of it
            if p.meta(sid).body != meta or tokens_of(p.generate(sid)) != ref:
                counts.add(wrong=1)
                counts.note(f"reader {sid} changed")
        for sid in [s for s in load.acked if s not in load.finished]:  # the writers' last sessions
            m = p.meta(sid).body
            if m["bytes_committed"] < load.acked[sid]:
                counts.add(lost_bytes=load.acked[sid] - m["bytes_committed"])
            resume(p, sid, DOC, counts)
            load.check(p, sid)
        counts.note(f"{len(load.finished)} documents written across the faults, each equal to its reference")
    assert alive(e.srv)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes
    assert slowest[0] <= TIMEOUT_S + SLACK_S, slowest


def test_redis_frozen_and_stopped(env: Env, fast_model: Atlas) -> None:
    redis_faults(env, fast_model, 1, 1, "short")


@pytest.mark.slow
def test_redis_frozen_and_stopped_full(env: Env, fast_model: Atlas) -> None:
    redis_faults(env, fast_model, 10, 5, "full")


# -- found by class 6 (tests/chaos/test_known_bugs.py has the store-level reproduction) ---------------

def test_an_ingest_in_flight_hears_of_a_frozen_redis_within_one_timeout(env: Env) -> None:
    assert env.redis.proc is not None
    pid = env.redis.proc.pid
    frozen_at: list[float] = []

    def freeze() -> None:
        time.sleep(0.15)  # the upload is under way, a checkpoint is due within ~8k tokens
        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())
        time.sleep(3 * TIMEOUT_S + 0.5)  # past the three timeouts it once took
        os.kill(pid, signal.SIGCONT)

    with Probe(env.srv.url, ClassCounts("found by class 6", "-"), OPS) as p:
        sid = p.create()
        t = threading.Thread(target=freeze)
        t.start()
        try:
            a = p.ingest(sid, paced(b"x" * 200_000, 4096, 0.01))
            answered = time.monotonic()
        finally:
            t.join()
        assert a.code == "store_unavailable", a
        held = answered - frozen_at[0]
        assert held < TIMEOUT_S + 1.0, held  # about 3.0 s: three timeouts
