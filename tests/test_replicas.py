"""Scale-out on one machine: two ``atlas serve`` replicas on one redis-server (loopback, AOF on).

What the architecture promises for replicas ("Scale-out"), checked end to end over HTTP:
- any replica serves any session from the store, and a replica's hot cache never serves a state
  older than the store's generation (A answers with what B wrote after A cached the session);
- two writers on one session across replicas: one wins, the other gets 409 ``lease_conflict``;
- a replica killed mid-ingest (SIGKILL: no drain) holds its lease only until it expires; another
  replica then resumes from ``bytes_committed`` and ends in the state of an uninterrupted ingest.

"Same state" is checked against a reference computed in this process with the same checkpoint:
tokens, bytes_committed and a greedy continuation.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from atlas.engine import Atlas, SamplingParams
from atlas.engine.checkpoint import save_checkpoint
from bench.server_process import ServerProcess

from .helpers import document, tiny_atlas
from .store_helpers import RedisServer, redis_server_binary

#: Two servers and a reference model load before the first test: minutes on a small machine.
pytestmark = pytest.mark.slow

LEASE_TTL_MS = 2000
KEY = "replica-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The continuation right after the document (no prompt): with a tiny model it depends on the state
# far more than a fixed prompt's would, which gives the comparisons teeth.
PROMPT = ""
MAX_TOKENS = 12
#: Prefix lengths of DOC that the tests end on; the reference state is taken at each.
P1, P2, P3 = 1200, 2000, 3600
#: Weights scaled up from the default init (std 0.02), whose logits are so flat that a random
#: model's greedy continuation is the same after any document: it could not tell two states apart.
WEIGHT_SCALE = 10.0


#: Prose with multi-byte UTF-8 characters, so that byte offsets fall inside characters.
DOC = document(P3).replace(b"e", "\u00e9".encode(), 40)[:P3]


@dataclass
class Reference:
    """What a single process gives for DOC[:n]: the greedy continuation of PROMPT."""

    continuation: dict[int, list[int]]


@dataclass
class Cluster:
    a: ServerProcess
    b: ServerProcess
    ref: Reference


def _reference(checkpoint: Path) -> Reference:
    """Feed DOC once, taking the state at each prefix (streaming invariance makes that the state
    of feeding the prefix alone) and continuing it greedily."""
    atlas = Atlas.load(checkpoint, device="cpu")
    state, done, out = atlas.new_state(), 0, {}
    for n in (P1, P2, P3):
        state, _ = atlas.feed(state, list(DOC[done:n]))
        done = n
        gen = atlas.generate(state.fork(), PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        out[n] = [tok.id for tok in gen]
    return Reference(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_server_binary()  # skips the module when redis-server is not installed
    tmp = tmp_path_factory.mktemp("replicas")
    atlas = tiny_atlas()
    with torch.no_grad():
        for p in atlas.model.parameters():
            if p.dim() >= 2:
                p.mul_(WEIGHT_SCALE)
    checkpoint = save_checkpoint(atlas.model, tmp / "model")
    redis = RedisServer(tmp / "redis", "--appendonly", "yes")
    replicas: list[ServerProcess] = []
    try:
        redis.start()
        settings = {"ATLAS_MODEL": str(checkpoint), "ATLAS_REDIS_URL": redis.url,
                    "ATLAS_API_KEYS": f"{KEY}:acme", "ATLAS_DEVICE": "cpu",
                    "ATLAS_LEASE_TTL_MS": str(LEASE_TTL_MS), "ATLAS_CHECKPOINT_TOKENS": "64",
                    "ATLAS_PROGRESS_INTERVAL_S": "0", "ATLAS_DATA_DIR": str(tmp / "data"),
                    "ATLAS_DRAIN_TIMEOUT_S": "5"}
        replicas = [ServerProcess(tmp / name, settings) for name in ("a", "b")]
        for r in replicas:
            r.spawn()
        ref = _reference(checkpoint)  # while the replicas load
        for r in replicas:
            r.wait_ready(timeout_s=90)
        # The check has teeth only if different states continue differently.
        assert len({tuple(c) for c in ref.continuation.values()}) == 3, ref.continuation
        yield Cluster(replicas[0], replicas[1], ref)
    finally:
        for r in replicas:
            r.kill()
        redis.kill()


# -- HTTP ------------------------------------------------------------------------------------------

def _events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def create(replica: ServerProcess) -> str:
    r = httpx.post(replica.url + "/v1/sessions", headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def get(replica: ServerProcess, sid: str) -> dict:
    r = httpx.get(f"{replica.url}/v1/sessions/{sid}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ingest(replica: ServerProcess, sid: str, body: bytes | Iterator[bytes], offset: int,
           timeout_s: float = 120.0) -> tuple[int, list[dict] | dict]:
    """(status, SSE events) on 200, else (status, the error body). An iterator body is sent
    chunked, as it is produced."""
    with httpx.Client(timeout=timeout_s) as client, client.stream(
            "POST", f"{replica.url}/v1/sessions/{sid}/ingest", params={"offset": offset}, content=body,
            headers={**AUTH, "Content-Type": "text/plain"}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        return 200, _events(r)


def ingest_ok(replica: ServerProcess, sid: str, body: bytes, offset: int) -> dict:
    status, events = ingest(replica, sid, body, offset)
    assert status == 200, events
    assert isinstance(events, list) and events and not any("error" in e for e in events), events
    assert events[-1]["done"] is True
    return events[-1]


def continuation(replica: ServerProcess, sid: str) -> list[int]:
    """Greedy continuation of PROMPT; on a fork, so the session stays as it was."""
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    with httpx.stream("POST", f"{replica.url}/v1/sessions/{sid}/generate", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = _events(r)
    assert not any("error" in e for e in events), events
    assert events[-1].get("done") is True, events[-1]
    return [e["token"] for e in events if "token" in e]


def store_conflicts(replicas: tuple[ServerProcess, ...]) -> float | None:
    """Writes refused by a lease so far, over the replicas (None if /metrics does not say)."""
    total = 0.0
    for replica in replicas:
        text = httpx.get(replica.url + "/metrics", headers=AUTH, timeout=30).text
        m = re.search(r"^atlas:store_conflicts(?:_total)? (\S+)$", text, re.M)
        if m is None:
            return None
        total += float(m.group(1))
    return total


def assert_session(replica: ServerProcess, sid: str, n: int, ref: Reference) -> None:
    """The session holds DOC[:n] exactly as a single uninterrupted process would."""
    meta = get(replica, sid)
    assert (meta["tokens"], meta["bytes_committed"]) == (n, n), meta
    assert continuation(replica, sid) == ref.continuation[n]


# -- the tests -------------------------------------------------------------------------------------

def test_any_replica_serves_any_session_and_no_stale_cache(cluster: Cluster) -> None:
    a, b, ref = cluster.a, cluster.b, cluster.ref
    sid = create(a)
    done = ingest_ok(a, sid, DOC[:P1], offset=0)
    assert (done["tokens"], done["bytes_committed"]) == (P1, P1)
    assert_session(b, sid, P1, ref)  # B never saw the session: it reads it from the store
    # A now holds the session in its hot cache; B moves it on under a newer generation.
    gen_before = get(a, sid)["generation"]
    ingest_ok(b, sid, DOC[P1:P2], offset=P1)
    assert get(a, sid)["generation"] > gen_before
    assert_session(a, sid, P2, ref)  # a stale cache would continue DOC[:P1] instead
    assert get(a, sid)["state_bytes"] == get(b, sid)["state_bytes"]


def test_concurrent_writers_one_wins_the_other_gets_409(cluster: Cluster) -> None:
    a, b, ref = cluster.a, cluster.b, cluster.ref
    sid = create(a)
    barrier = threading.Barrier(2)
    started = [threading.Event(), threading.Event()]
    go = threading.Event()
    results: list[tuple[int, list[dict] | dict] | BaseException | None] = [None, None]

    def body(i: int) -> Iterator[bytes]:
        # The request (and so its lease attempt) reaches the server with the first piece; the rest
        # waits until both servers have seen theirs, so both writers are in flight at once.
        yield DOC[:256]
        started[i].set()
        go.wait(30)
        for k in range(256, P1, 256):
            yield DOC[k:min(k + 256, P1)]

    def run(i: int, replica: ServerProcess) -> None:
        try:
            barrier.wait(10)
            results[i] = ingest(replica, sid, body(i), offset=0)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate((a, b))]
    refused = store_conflicts((a, b))
    for t in threads:
        t.start()
    try:
        assert all(e.wait(30) for e in started)
        # Hold both bodies open until one server has refused its writer (it asks for the lease as
        # the request arrives; the 409 stays unread until the body is sent).
        deadline = time.monotonic() + (30 if refused is not None else 1)
        while time.monotonic() < deadline and (refused is None or store_conflicts((a, b)) == refused):
            time.sleep(0.05)
    finally:
        go.set()
        for t in threads:
            t.join(60)
    assert not any(isinstance(r, BaseException) for r in results), results
    outcomes = [r for r in results if isinstance(r, tuple)]
    assert sorted(status for status, _ in outcomes) == [200, 409], results
    win = 0 if outcomes[0][0] == 200 else 1
    winner, loser = outcomes[win][1], outcomes[1 - win][1]
    assert isinstance(loser, dict) and loser["error"]["code"] == "lease_conflict", loser
    assert isinstance(winner, list) and winner[-1]["done"] and winner[-1]["bytes_committed"] == P1, winner
    # Not a lost update: the loser retries the same bytes, which the session already has.
    ingest_ok((a, b)[1 - win], sid, DOC[:P1], offset=0)
    assert_session(a, sid, P1, ref)


def test_replica_killed_mid_ingest_another_resumes(cluster: Cluster) -> None:
    a, b, ref = cluster.a, cluster.b, cluster.ref
    sid = create(a)
    stop = threading.Event()
    outcome: list[object] = []

    def slow_body() -> Iterator[bytes]:
        for k in range(0, P3, 64):
            if stop.is_set():
                return
            yield DOC[k:k + 64]
            time.sleep(0.05)

    def upload() -> None:
        try:
            outcome.append(ingest(a, sid, slow_body(), offset=0))
        except httpx.HTTPError as e:  # expected: the server dies under it
            outcome.append(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        # Kill A once B sees checkpoints of this ingest in the store: A is mid-ingest.
        deadline = time.monotonic() + 60
        while get(b, sid)["bytes_committed"] < 640:
            assert time.monotonic() < deadline, "no checkpoint from A"
            assert uploader.is_alive(), outcome
            time.sleep(0.05)
        a.kill()
        killed = time.monotonic()
    finally:
        stop.set()
        uploader.join(30)
    assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome  # A died under the upload

    committed = get(b, sid)["bytes_committed"]
    assert 640 <= committed < P3
    # A's lease outlives A until its TTL runs out.
    status, err = ingest(b, sid, DOC[committed:], offset=committed)
    if time.monotonic() - killed < LEASE_TTL_MS / 2000:  # surely within the TTL when it was asked
        assert status == 409 and isinstance(err, dict) and err["error"]["code"] == "lease_conflict", err
    while status == 409:
        assert isinstance(err, dict) and err["error"]["code"] == "lease_conflict", err
        assert time.monotonic() - killed < 3 * LEASE_TTL_MS / 1000, "the dead replica's lease never expired"
        time.sleep(0.2)
        committed = get(b, sid)["bytes_committed"]
        status, err = ingest(b, sid, DOC[committed:], offset=committed)
    assert status == 200 and isinstance(err, list), err
    assert not any("error" in e for e in err) and err[-1]["done"], err[-1]
    assert (err[-1]["tokens"], err[-1]["bytes_committed"]) == (P3, P3)
    assert_session(b, sid, P3, ref)

    # A replica started afresh (cold cache) serves the session too.
    a.start(timeout_s=90)
    assert_session(a, sid, P3, ref)
