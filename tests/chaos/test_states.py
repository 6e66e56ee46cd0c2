"""Classes 3 and 4: damaged stored states and damaged session metadata, on a running server.

3. States written straight into Redis: values the model cannot step (NaN, 3e38 in a memory weight,
   +inf logits, a pending token id outside the vocabulary, negative or out-of-range counters), sealed
   with the server's key as a buggy writer would; and forged ones (a part rewritten with its checksum
   recomputed and the manifest re-sealed without the key or with a wrong one, or bytes flipped, or a
   part cut short). They are asked at once beside healthy sessions: every damaged one answers 409
   ``state_corrupt``, every healthy one exactly the tokens it gives alone.
4. One field of a session's hash changed (every field, in several ways): listing, creating and
   forking in the tenant keep working; the session is listed as broken or still served exactly as
   before, never served wrong, and it can be deleted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest
import redis
import torch

from atlas.engine import Atlas, SessionState
from atlas.engine.store.integrity import ManifestSeal, part_digest
from bench.server_process import ServerProcess

from ..helpers import document
from ..store_helpers import RedisServer
from . import table
from .harness import Answer, Probe, alive, store_for, tokens_of

KEY = "chaos-state-key"
ACME = {"Authorization": "Bearer k-acme"}
TEXT = document(40_000)


def doc(i: int) -> bytes:
    """A short document of its own for session `i` (different sessions, different answers)."""
    start = (i * 997) % 30_000
    return TEXT[start:start + 3_000 + 37 * (i % 50)]


class Env:
    """A server on an external Redis with ATLAS_STATE_KEY, a raw client on that Redis, the model."""

    def __init__(self, srv: ServerProcess, redis_server: RedisServer, atlas: Atlas) -> None:
        self.srv, self.redis, self.atlas = srv, redis_server, atlas
        self.raw = redis.Redis(port=redis_server.port)  # bytes in, bytes out
        self.n = 0

    def session(self, p: Probe) -> tuple[str, list[int]]:
        """A new session that has read its own document, and its greedy answer alone."""
        self.n += 1
        sid = p.create()
        assert p.ingest(sid, doc(self.n)).ok
        return sid, tokens_of(p.generate(sid))

    def hash_key(self, sid: str) -> str:
        return f"atlas:{{{sid}}}:s"

    def manifest(self, sid: str) -> dict:
        return dict(json.loads(self.raw.hget(self.hash_key(sid), "manifest") or b"{}"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fast_checkpoint: Path, fast_model: Atlas) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("states")
    rs = RedisServer(work / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    srv = ServerProcess(work, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_REDIS_URL": rs.url,
                               "ATLAS_STATE_KEY": KEY, "ATLAS_API_KEYS": "k-acme:acme"})
    try:
        srv.start()
        e = Env(srv, rs, fast_model)
        yield e
        e.raw.close()
    finally:
        srv.kill()
        rs.kill()


# -- 3. damaged and forged states ---------------------------------------------------------------------

def _edited(state: SessionState, key: str, edit: Callable[[torch.Tensor], object]) -> SessionState:
    t = state.tensors[key].clone()
    edit(t)
    return SessionState(dict(state.tensors, **{key: t}), state.fingerprint)


def _set(index: int, value: float) -> Callable[[torch.Tensor], object]:
    return lambda t: t.view(-1).__setitem__(index, value)


W = "layers.0.mem.W"
#: Values the model cannot step, written with the server's key (what a buggy writer would store).
VALUE_DAMAGE: dict[str, tuple[str, Callable[[torch.Tensor], object]]] = {
    "nan": (W, _set(3, float("nan"))),
    "huge": (W, _set(3, 3e38)),
    "inf-logits": ("last_logits", _set(0, float("inf"))),
    "pending-oov": ("pending", _set(0, 10_000)),
    "negative-pos": ("pos", lambda t: t.fill_(-5)),
    "pos-behind": ("pos", lambda t: t.fill_(50)),  # before the start of its chunk
    "negative-tokens": ("tokens", lambda t: t.fill_(-1)),
}
#: Damage to what Redis holds, done by someone without the key.
FORGERIES = ["forged-unkeyed", "forged-wrong-key", "bitrot", "truncated"]
KINDS = list(VALUE_DAMAGE) + FORGERIES


def damage(e: Env, sid: str, kind: str, donor: bytes) -> None:
    """Store a damaged state for `sid` (a session that has read its document)."""
    if kind in VALUE_DAMAGE:
        key, edit = VALUE_DAMAGE[kind]
        state, _ = e.atlas.feed(e.atlas.new_state(), list(doc(e.n + 1)[:100]))
        bad = e.atlas.save_state(_edited(state, key, edit))
        store = store_for(e.redis.url, KEY)
        try:
            store.put(sid, bad, fingerprint=e.atlas.fingerprint, tokens=100, bytes_committed=100)
        finally:
            store.close()
        return
    # Committed again first (a new generation), so that the server's hot cache, which still holds
    # the healthy state of the old one, cannot answer and the damaged bytes are what it loads.
    store = store_for(e.redis.url, KEY)
    try:
        data, meta = store.get(sid)
        store.put(sid, data, fingerprint=e.atlas.fingerprint, tokens=meta.tokens,
                  bytes_committed=meta.bytes_committed)
    finally:
        store.close()
    m = e.manifest(sid)
    part = f"atlas:{{{sid}}}:p:{m['wid']}:0"
    if kind == "bitrot":  # a flipped byte, checksum left as it was
        rotten = bytearray(cast(bytes, e.raw.get(part)))
        rotten[len(rotten) // 2] ^= 0x10
        e.raw.set(part, bytes(rotten))
        return
    if kind == "truncated":
        e.raw.set(part, cast(bytes, e.raw.get(part))[:-100])
        return
    # Forged: a valid state of another session (a plausible answer, but not this session's), its
    # checksum recomputed, the manifest sealed with what the forger holds.
    assert len(donor) == m["parts"][0][0] and len(m["parts"]) == 1
    e.raw.set(part, donor)
    m["parts"][0][1] = part_digest(donor, m["hash"])
    seal = ManifestSeal() if kind == "forged-unkeyed" else ManifestSeal("guess")
    e.raw.hset(e.hash_key(sid), "manifest", json.dumps(seal.seal(m)))


def damaged_states(e: Env, rounds: int, per_round: int, healthy: int, size: str) -> None:
    counts = table.counts("3. damaged/forged states", size)
    refusals: list[str] = []
    try:
        for r in range(rounds):
            with Probe(e.srv.url, counts, ACME) as p:
                good = [e.session(p) for _ in range(healthy)]
                donor_sid, _ = e.session(p)
                store = store_for(e.redis.url, KEY)
                donor = store.get(donor_sid)[0]
                store.close()
                bad = []
                for i in range(per_round):
                    kind = KINDS[(r * per_round + i) % len(KINDS)]
                    sid, _ = e.session(p)
                    damage(e, sid, kind, donor)
                    bad.append((sid, kind))
                counts.add(faults=len(bad))

            def ask(sid: str, ingest: bool = False) -> Answer:
                with Probe(e.srv.url, counts, ACME) as q:
                    return q.ingest(sid, b"more text") if ingest else q.generate(sid)

            # All at once: the damaged ones share decode batches with the healthy ones.
            jobs = [(sid, False) for sid, _ in good] + [(sid, False) for sid, _ in bad] + \
                [(sid, True) for sid, _ in bad[: max(1, per_round // 4)]]
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(lambda j: ask(*j), jobs))
            for (sid, ref), a in zip(good, answers[:healthy], strict=True):
                if not a.ok or tokens_of(a) != ref:
                    counts.add(wrong=1)
                    counts.note(f"healthy {sid}: {a.status} {a.code} {tokens_of(a)} != {ref}")
            for (sid, is_ingest), a in zip(jobs[healthy:], answers[healthy:], strict=True):
                kind = dict(bad)[sid]
                if a.ok:
                    counts.add(wrong=1)
                    counts.note(f"{kind} session {sid} was served: {a.status} {a.last}")
                elif (a.status, a.code) != (409, "state_corrupt"):
                    refusals.append(f"{kind} ({'ingest' if is_ingest else 'generate'}): {a.status} {a.code}")
            with Probe(e.srv.url, counts, ACME) as p:
                for sid, _ in bad:
                    assert p.delete(f"/v1/sessions/{sid}").status == 204
                for sid, _ in [*good, (donor_sid, None)]:
                    assert p.delete(f"/v1/sessions/{sid}").status == 204
        assert alive(e.srv)
    finally:
        table.finish(counts)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes
    assert not refusals, refusals  # refused, and refused as state_corrupt


def test_damaged_states(env: Env) -> None:
    damaged_states(env, 1, 5, 3, "short")


@pytest.mark.slow
def test_damaged_states_full(env: Env) -> None:
    damaged_states(env, 5, 20, 6, "full")


# -- 4. metadata flips --------------------------------------------------------------------------------

FIELDS = ["tenant", "created", "updated", "tokens", "bytes_committed", "state_bytes", "fingerprint", "gen",
          "wid", "ttl_s", "extra", "manifest"]
#: The same served counters before and after, or the session is refused.
SERVED = ("tokens", "bytes_committed", "state_bytes", "generation")


def flip(value: str, how: int) -> str:
    """0: one character in the middle changed (a digit moves on); 1: the first one; 2: garbage."""
    if how == 2:
        return "x" + uuid.uuid4().hex[:4]
    if not value:
        return "\x01"
    i = len(value) // 2 if how == 0 else 0
    c = value[i]
    new = str((int(c) + 1) % 10) if c.isdigit() else ("#" if c != "#" else "$")
    return value[:i] + new + value[i + 1:]


def metadata_flips(e: Env, hows: list[int], size: str) -> None:
    counts = table.counts("4. metadata flips", size)
    try:
        with Probe(e.srv.url, counts, ACME) as p:
            healthy, healthy_ref = e.session(p)
            for how in hows:
                for field in FIELDS:
                    sid, ref = e.session(p)
                    before = p.meta(sid).body
                    hk = e.hash_key(sid)
                    old = cast(bytes, e.raw.hget(hk, field) or b"").decode()
                    e.raw.hset(hk, field, flip(old, how))
                    counts.add(faults=1)
                    what = f"{field} {old[:40]!r} (flip {how})"
                    # The tenant keeps working around the damaged session.
                    listed = p.get("/v1/sessions")
                    assert listed.status == 200, (what, listed)
                    entry = {s["id"]: s for s in listed.body["data"]}.get(sid)
                    for route in ("/v1/sessions", f"/v1/sessions/{healthy}/fork"):
                        made = p.post(route)
                        assert made.status == 201, (what, route, made)
                        assert p.delete(f"/v1/sessions/{made.body['id']}").status == 204
                    # The damaged one: refused, or served exactly as before.
                    m = p.meta(sid)
                    if m.ok and not m.body.get("broken"):
                        if any(m.body[k] != before[k] for k in SERVED):
                            counts.add(wrong=1)
                            counts.note(f"{what}: served changed metadata {m.body}")
                    elif m.ok or m.status not in (404, 409):
                        counts.note(f"{what}: GET answered {m.status} {m.code} {m.body}")
                    g = p.generate(sid)
                    if g.ok and tokens_of(g) != ref:
                        counts.add(wrong=1)
                        counts.note(f"{what}: served {tokens_of(g)} instead of {ref}")
                    if entry is None or (not g.ok and not (entry and entry.get("broken"))):
                        counts.note(f"{what}: listed as {entry}, generate {g.status} {g.code}")
                    d = p.delete(f"/v1/sessions/{sid}")
                    if d.status != 204:
                        counts.add(wrong=1)
                        counts.note(f"{what}: not deletable: {d.status} {d.code}")
                    after = {s["id"] for s in p.get("/v1/sessions").body["data"]}
                    assert sid not in after, what
            if tokens_of(p.generate(healthy)) != healthy_ref:
                counts.add(wrong=1)
                counts.note("the healthy session changed")
        assert alive(e.srv)
    finally:
        table.finish(counts)
    assert (counts.lost_bytes, counts.wrong, counts.errors_5xx) == (0, 0, 0), counts.notes


def test_metadata_flips(env: Env) -> None:
    metadata_flips(env, [0], "short")


@pytest.mark.slow
def test_metadata_flips_full(env: Env) -> None:
    metadata_flips(env, [0, 1, 2], "full")
