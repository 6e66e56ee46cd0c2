"""The Redis backend of the state store (standalone Redis, Redis Cluster, and the embedded server).

Key layout (``P`` = key prefix; every key of a session carries the hash tag ``{sid}``, so a
session lives in one Redis Cluster slot and its Lua scripts are legal there):

=========================  ======  ==========================================================
``P:{sid}:s``              hash    metadata fields, ``gen`` (committed generation), ``wid`` (write
                                   id of that generation), ``manifest`` (JSON, see below)
``P:{sid}:p:<wid>:<i>``    string  part ``i`` of the state bytes written by write ``wid``
``P:{sid}:lease``          string  ``"<fence> <nonce> <owner>"``, SET NX PX: the write lease
``P:{sid}:fence``          string  fencing counter, INCR on every lease grant
``P:{sid}:new``            string  set while a create is between its index entry and its hash
``P:tenant:{tenant}``      set     ids of a tenant's sessions (an index, and the session cap;
                                   ids of sessions that expired are pruned)
``P:alive:{owner}``        string  heartbeat of a runtime that holds leases (expires when it dies)
=========================  ======  ==========================================================

A put takes two round trips. First, one pipeline reads the committed generation and manifest and
writes the parts under a fresh random write id with a pending TTL (straight from ``memoryview``
slices, no copy; parts are hashed in worker threads meanwhile). Then one commit script checks the
writer (fence equals the counter, or no lease is held when unfenced), checks that the committed
generation is still the one read before (no concurrent commit: lost-update guard), that every new
part exists, makes the parts permanent (or gives them the session TTL), bumps ``gen``, swaps
``wid`` + ``manifest`` + metadata in the hash, and unlinks the previous generation's parts.
Readers see the old or the new generation, never a mix; a crashed writer leaves only pending parts,
which expire.

The manifest (format 2) is what is served: the session id and tenant, the committed generation and
its write id, the model fingerprint, the token and byte counters, the total size, the checksum
algorithm and per-part ``[length, checksum]``, sealed (``integrity.ManifestSeal``: a digest, or a
keyed MAC with ``ATLAS_STATE_KEY``). Every read of a session checks the seal and that the loose hash
fields agree with it; a session whose metadata fails is refused (``state_corrupt``) alone: it is
listed as broken, never blocks its tenant, and can always be deleted. Manifests of format 1 (no
seal, counters in the hash) are still read when no key is set, and rewritten at the next commit.

``P:tenant:{tenant}`` also enforces the per-tenant session cap: an id is admitted to it by one
script that counts and adds atomically (``create(max_sessions=)``), so concurrent creates and forks
never exceed it, and nothing is listed to count. ``P:alive:{owner}`` is the heartbeat of a runtime
(owners named ``runtime-*``): a lease whose holder's heartbeat expired is taken over at once instead
of after the lease's TTL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from .base import KEEP, Buffer, Keep, Lease, SessionMeta, StateStore, StatsRecorder, StoreStats
from .errors import (
    ForeignModelError,
    LeaseConflictError,
    NoStateError,
    SessionExistsError,
    StateCorruptError,
    StateNotFoundError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TooManySessionsError,
)
from .integrity import (
    CRYPTOGRAPHIC,
    FORMAT_VERSION,
    ID_RE,
    ManifestError,
    ManifestSeal,
    check_manifest,
    part_digest,
)
from .redis_scripts import SCRIPTS
from .settings import StoreSettings

#: Lease owners with this prefix keep a heartbeat key alive (``RedisStore.heartbeat``).
HEARTBEAT_OWNERS = "runtime-"
#: Parts are sent in pipelined batches of about this many bytes (their checksums are computed by
#: worker threads meanwhile) ...
WRITE_BATCH_BYTES = 16 << 20
#: ... and fetched in smaller ones, so that checksums of one batch overlap the transfer of the next.
READ_BATCH_BYTES = 4 << 20
#: At most this many commands per pipelined batch (many tiny parts).
BATCH_PARTS = 1024
#: A load, update or delete that keeps racing with commits gives up after this many attempts.
RETRIES = 8
#: Socket reads of this size: fewer Python-level iterations per large bulk reply.
SOCKET_READ_BYTES = 1 << 20

_META_FIELDS = ("tenant", "created", "updated", "tokens", "bytes_committed", "state_bytes",
                "fingerprint", "gen", "ttl_s", "extra", "wid", "manifest")
#: A create's index entry counts as on its way (not stale) for this long before its session exists.
PENDING_CREATE_MS = 60_000
def _int0(v: str) -> int:
    """A counter field read leniently (what a replacing commit needs from a broken session)."""
    try:
        return max(0, int(v))
    except ValueError:
        return 0


def _float0(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        return 0.0
    return x if math.isfinite(x) else 0.0


def _claims(f: dict[str, str], tenant: str) -> bool:
    """Whether a session's hash says it is ``tenant``'s: its tenant field or, when that field is
    damaged, its manifest (the index alone is not proof: a failed create leaves entries)."""
    if f.get("tenant") == tenant:
        return True
    try:
        return json.loads(f.get("manifest") or "null")["tenant"] == tenant
    except (ValueError, TypeError, KeyError):
        return False


def _text(v: bytes | str | None) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else v


def _as_view(data: Buffer) -> memoryview:
    """A flat byte view of ``data`` without copying it."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


@contextmanager
def _redis_errors(sid: str | None = None) -> Iterator[None]:
    """Turn redis-py failures into StoreUnavailableError (the server answers 503)."""
    try:
        yield
    except StoreError:
        raise
    except redis.RedisError as e:
        if isinstance(e, redis.exceptions.OutOfMemoryError) or str(e).startswith("OOM "):
            raise StoreFullError(f"redis is out of memory ({e}): delete sessions, or give it more "
                                 "(maxmemory)", sid=sid) from e
        raise StoreUnavailableError(f"redis: {type(e).__name__}: {e}", sid=sid) from e


def _changed_fields(tokens: int | None, bytes_committed: int | None,
                    extra: dict[str, Any] | None) -> dict[str, str]:
    """The metadata fields a commit or an update writes: the time, and whatever the caller gives."""
    fields = {"updated": repr(time.time())}
    if tokens is not None:
        fields["tokens"] = str(int(tokens))
    if bytes_committed is not None:
        fields["bytes_committed"] = str(int(bytes_committed))
    if extra is not None:
        fields["extra"] = json.dumps(extra)
    return fields


class RedisLease(Lease):
    """A lease held in ``P:{sid}:lease``; see :class:`~.base.Lease`."""

    def __init__(self, store: RedisStore, sid: str, owner: str, fence: int, ttl_ms: int,
                 nonce: str) -> None:
        self._store = store
        self.sid = sid
        self.owner = owner
        self.fence = fence
        self.ttl_ms = ttl_ms
        self._nonce = nonce
        self._released = False

    def renew(self, ttl_ms: int | None = None) -> None:
        ttl = ttl_ms or self.ttl_ms
        with _redis_errors(self.sid):
            ok = self._store._run("renew", [self._store._lease_key(self.sid)], [self._nonce, ttl])
        if not ok:
            self._store._stats.count("conflicts")
            raise LeaseConflictError(f"lease {self.fence} on {self.sid} was lost", sid=self.sid)
        self.ttl_ms = ttl

    def release(self) -> None:
        if self._released:
            return
        with _redis_errors(self.sid):
            self._store._run("release", [self._store._lease_key(self.sid)], [self._nonce])
        self._released = True

    @property
    def held(self) -> bool:
        with _redis_errors(self.sid):
            v = _text(self._store._client.get(self._store._lease_key(self.sid)))
        return v.split(" ")[1:2] == [self._nonce]

    def __repr__(self) -> str:
        return f"RedisLease(sid={self.sid!r}, owner={self.owner!r}, fence={self.fence})"


class RedisStore(StateStore):
    """State store on a Redis client (``redis.Redis``, ``RedisCluster`` or the embedded server).

    Thread-safe: redis-py clients are, and every call uses its own pipeline."""

    def __init__(self, client: redis.Redis | RedisCluster, settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        self._client = client
        self._prefix = self.settings.key_prefix
        self._part_bytes = self.settings.part_bytes
        self._stats = StatsRecorder()
        self._seal = ManifestSeal(
            self.settings.state_key.get_secret_value() if self.settings.state_key else None,
            [k.strip() for k in (self.settings.state_keys_old.get_secret_value()
                                 if self.settings.state_keys_old else "").split(",")])
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> RedisStore:
        """Connect to ``settings.redis_url`` (a cluster seed node if ``redis_cluster``)."""
        if not settings.redis_url:
            raise ValueError("redis_url is required; use open_store() for the embedded store")
        return cls(connect(settings.redis_url, cluster=settings.redis_cluster,
                           timeout_s=settings.socket_timeout_s), settings)

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The underlying redis-py client (for health checks and tools)."""
        return self._client

    # -- keys -----------------------------------------------------------------------------------
    def _base(self, sid: str) -> str:
        return f"{self._prefix}:{{{sid}}}"

    def _hash_key(self, sid: str) -> str:
        return self._base(sid) + ":s"

    def _lease_key(self, sid: str) -> str:
        return self._base(sid) + ":lease"

    def _fence_key(self, sid: str) -> str:
        return self._base(sid) + ":fence"

    def _pending_key(self, sid: str) -> str:
        return self._base(sid) + ":new"

    def _index_key(self, tenant: str) -> str:
        return f"{self._prefix}:tenant:{{{tenant}}}"

    def _part_keys(self, sid: str, wid: str, n: int) -> list[str]:
        base = f"{self._base(sid)}:p:{wid}:"
        return [base + str(i) for i in range(n)]

    def _manifest_keys(self, sid: str, manifest: dict[str, Any] | None) -> list[str]:
        return self._part_keys(sid, manifest["wid"], len(manifest["parts"])) if manifest else []

    @staticmethod
    def _check_id(kind: str, value: str) -> None:
        if not isinstance(value, str) or not ID_RE.fullmatch(value):
            raise ValueError(f"invalid {kind} {value!r}: 1-200 printable ASCII characters, "
                             "no spaces or braces")

    # -- plumbing -------------------------------------------------------------------------------
    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args), client=self._client)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                                thread_name_prefix="atlas-store")
            return self._pool

    # -- manifests and metadata -------------------------------------------------------------------
    def _checksum(self) -> str:
        algo = self.settings.state_checksum
        return algo if not self._seal.keyed or algo in CRYPTOGRAPHIC else "blake2b"

    def _manifest(self, sid: str, f: dict[str, str], strict: bool = True) -> dict[str, Any] | None:
        """The session's manifest (format 2 shape), checked: shape, seal, and agreement with the
        loose hash fields. None for a format 1 session with nothing committed. A failed check raises
        StateCorruptError, or with ``strict`` False gives None (what a replacing commit reads)."""
        try:
            return check_manifest(self._seal, sid, f)
        except ManifestError as e:
            if not strict:
                return None
            self._stats.count("corrupt")
            raise StateCorruptError(f"session {sid}: {e}; the session is refused", sid=sid) from None

    def _meta(self, sid: str, f: dict[str, str]) -> tuple[SessionMeta, dict[str, Any] | None]:
        """Metadata of a session from its hash fields, the counters from its checked manifest."""
        m = self._manifest(sid, f)
        try:
            ttl, extra = f.get("ttl_s", ""), json.loads(f.get("extra") or "{}")
            created, updated = float(f["created"]), float(f["updated"])
            if not isinstance(extra, dict) or not (math.isfinite(created) and math.isfinite(updated)):
                raise ValueError("not an object or not a finite time")
            if m is None:  # format 1, nothing committed
                m = {"tenant": f["tenant"], "tokens": 0, "bytes_committed": 0, "size": 0,
                     "fingerprint": f.get("fingerprint", ""), "gen": 0}
                counters = None
            else:
                counters = m
            meta = SessionMeta(id=sid, tenant=m["tenant"], created=created, updated=updated,
                               tokens=m["tokens"], bytes_committed=m["bytes_committed"],
                               state_bytes=m["size"], fingerprint=m["fingerprint"], generation=m["gen"],
                               ttl_s=int(ttl) if ttl else None, extra=extra)
        except (KeyError, ValueError, TypeError) as e:
            self._stats.count("corrupt")
            raise StateCorruptError(f"session {sid}: unreadable metadata ({type(e).__name__}); the "
                                    "session is refused", sid=sid) from None
        return meta, counters

    @staticmethod
    def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
        return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}

    def _read_fields(self, sid: str) -> dict[str, str]:
        with _redis_errors(sid):
            values = self._client.hmget(self._hash_key(sid), list(_META_FIELDS))
        if all(v is None for v in values):
            raise StateNotFoundError(f"session {sid} not found", sid=sid)
        return {n: _text(v) for n, v in zip(_META_FIELDS, values, strict=True)}

    def _current_parts(self, sid: str, fields: dict[str, str]) -> tuple[str, list[str]]:
        """The committed generation as stored (the scripts' guard compares it) and its part keys,
        read leniently: a replacing commit or a delete must find them even in a broken manifest.
        Keys are built under the session's own hash tag, so a forged manifest names no other key."""
        try:
            m = json.loads(fields.get("manifest") or "null")
            wid, n = m["wid"], len(m["parts"])
            keys = self._part_keys(sid, wid, n) if wid and ID_RE.fullmatch(wid) else []
        except (ValueError, TypeError, KeyError):
            keys = []
        return fields.get("gen") or "0", keys

    def _raise_status(self, sid: str, res: Sequence[Any]) -> None:
        status = _text(res[0])
        if status == "not_found":
            raise StateNotFoundError(f"session {sid} not found", sid=sid)
        if status == "exists":
            raise SessionExistsError(f"session {sid} already exists", sid=sid)
        if status == "lease_conflict":
            self._stats.count("conflicts")
            raise LeaseConflictError(f"session {sid}: {_text(res[1])}", sid=sid)
        if status == "parts_missing":
            raise StoreUnavailableError(
                f"session {sid}: part {_text(res[1])} vanished before commit (pending TTL too short "
                "or memory eviction)", sid=sid)
        raise StoreError(f"session {sid}: unexpected script reply {res!r}", sid=sid)

    @staticmethod
    def _batches(sizes: Sequence[int], limit: int) -> Iterator[range]:
        """Index ranges of consecutive parts worth about ``limit`` bytes (at least one part each)."""
        i = 0
        while i < len(sizes):
            start, total = i, 0
            while i < len(sizes) and (i == start or (total + sizes[i] <= limit
                                                     and i - start < BATCH_PARTS)):
                total += sizes[i]
                i += 1
            yield range(start, i)

    def _read_parts(self, keys: list[str], sizes: list[int],
                    on_part: Callable[[int, bytes | None], None]) -> list[bytes | None]:
        """GET every part in pipelined batches; ``on_part`` sees each part as its batch arrives."""
        out: list[bytes | None] = []
        for idx in self._batches(sizes, READ_BATCH_BYTES):
            if len(idx) == 1:
                # redis-py types GET as bytes | str | None; str only with decode_responses, never set here.
                batch = [cast("bytes | None", self._client.get(keys[idx.start]))]
            else:
                pipe = self._client.pipeline(transaction=False)
                for i in idx:
                    pipe.get(keys[i])
                batch = pipe.execute()
            for i, part in zip(idx, batch, strict=True):
                on_part(i, part)
            out.extend(batch)
        return out

    # -- public API -----------------------------------------------------------------------------
    def create(self, tenant: str, *, sid: str | None = None, fingerprint: str = "",
               ttl_s: int | None = None, extra: dict[str, Any] | None = None,
               data: Buffer | None = None, tokens: int | None = None, bytes_committed: int | None = None,
               max_sessions: int | None = None) -> SessionMeta:
        sid = uuid.uuid4().hex if sid is None else sid
        self._check_id("session id", sid)
        self._check_id("tenant", tenant)
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = repr(time.time())
        manifest = self._seal.seal({"v": FORMAT_VERSION, "sid": sid, "tenant": tenant, "gen": 0, "wid": "",
                                    "fingerprint": fingerprint, "size": 0, "hash": self._checksum(),
                                    "parts": [], "tokens": 0, "bytes_committed": 0})
        fields = {"tenant": tenant, "created": now, "updated": now, "tokens": "0",
                  "bytes_committed": "0", "state_bytes": "0", "fingerprint": fingerprint, "gen": "0",
                  "wid": "", "ttl_s": "" if ttl_s is None else str(ttl_s),
                  "extra": json.dumps(extra or {}), "manifest": json.dumps(manifest)}
        args: list[Any] = [uuid.uuid4().hex, "" if ttl_s is None else ttl_s * 1000]
        for k, v in fields.items():
            args += [k, v]
        # Admitted to the tenant's index first: the cap is counted there, and a crash in between
        # leaves an index entry that pruning drops, never a session that list() cannot see. The
        # pending key tells pruning, meanwhile, that the entry's session is on its way.
        with _redis_errors(sid):
            self._client.set(self._pending_key(sid), "1", px=PENDING_CREATE_MS)
        added = self._admit(tenant, sid, max_sessions)
        try:
            with _redis_errors(sid):
                res = self._run("create", [self._hash_key(sid), self._fence_key(sid),
                                           self._pending_key(sid)], args)
            if _text(res[0]) != "ok":
                self._raise_status(sid, res)
        except BaseException:
            if added:
                with contextlib.suppress(redis.RedisError):
                    self._client.srem(self._index_key(tenant), sid)
            raise
        if data is not None:
            try:
                return self.put(sid, data, fingerprint=fingerprint, tokens=tokens,
                                bytes_committed=bytes_committed)
            except BaseException:  # a fork or import that failed leaves no empty session behind
                with contextlib.suppress(Exception):  # (a store that is down: its TTL-less hash stays)
                    self.delete(sid, tenant=tenant)
                raise
        return self._meta(sid, fields)[0]

    def _admit(self, tenant: str, sid: str, cap: int | None) -> bool:
        """Add ``sid`` to the tenant's index unless that would pass ``cap`` (one atomic script);
        True if it was added now. At the cap, ids of sessions that expired are pruned first."""
        key = self._index_key(tenant)
        for attempt in range(2):
            with _redis_errors(sid):
                res = self._run("admit", [key], [sid, "" if cap is None else cap])
            status = _text(res[0])
            if status != "full":
                return status == "added"
            if attempt == 0 and not self._prune(tenant):
                break
        raise TooManySessionsError(f"this tenant holds {int(res[1])} sessions, the limit is {cap}; "
                                   "delete some first", sid=sid)

    def _prune(self, tenant: str) -> int:
        """Drop index entries of sessions that no longer exist (expired); how many were dropped."""
        key = self._index_key(tenant)
        with _redis_errors():
            sids = [_text(s) for s in self._client.smembers(key)]
            pipe = self._client.pipeline(transaction=False)
            for sid in sids:
                pipe.exists(self._hash_key(sid), self._pending_key(sid))
            gone = [sid for sid, n in zip(sids, pipe.execute() if sids else [], strict=True) if not n]
            if gone:
                self._client.srem(key, *gone)
        return len(gone)

    def owns(self, tenant: str, sid: str) -> bool:
        """Whether ``sid`` is in the tenant's index: who may delete a session whose metadata is broken."""
        self._check_id("tenant", tenant)
        self._check_id("session id", sid)
        with _redis_errors(sid):
            return bool(self._client.sismember(self._index_key(tenant), sid))

    def put(self, sid: str, data: Buffer, *, fingerprint: str, tokens: int | None = None,
            bytes_committed: int | None = None, extra: dict[str, Any] | None = None,
            fence: int | None = None) -> SessionMeta:
        self._check_id("session id", sid)
        t0 = time.perf_counter()
        mv = _as_view(data)
        n = mv.nbytes
        P = self._part_bytes
        views = [mv[o:o + P] for o in range(0, n, P)]
        sizes = [len(v) for v in views]
        wid = uuid.uuid4().hex
        new_keys = self._part_keys(sid, wid, len(views))
        hk, fk, lk = self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)
        fence_arg = "" if fence is None else str(fence)
        pending_ms = self.settings.pending_ttl_s * 1000
        algo = self._checksum()
        digests: list[Future[str]] = []
        with _redis_errors(sid):
            try:
                pool = self._executor()
                digests = [pool.submit(part_digest, v, algo) for v in views]
                # Round trip 1: read what is committed now, and send the parts.
                cur: list[Any] = []
                for b, idx in enumerate(self._batches(sizes, WRITE_BATCH_BYTES) if views else [range(0)]):
                    pipe = self._client.pipeline(transaction=False)
                    if b == 0:
                        pipe.hmget(hk, list(_META_FIELDS))
                    for i in idx:
                        pipe.set(new_keys[i], views[i], px=pending_ms)
                    res = pipe.execute()
                    if b == 0:
                        cur = res[0]
                f = {name: _text(v) for name, v in zip(_META_FIELDS, cur, strict=True)}
                old_gen, old_keys = self._current_parts(sid, f)
                # A broken manifest is replaced: its counters then come from the loose fields.
                old = self._manifest(sid, f, strict=False) or {
                    "tenant": f["tenant"], "gen": _int0(old_gen), "tokens": _int0(f["tokens"]),
                    "bytes_committed": _int0(f["bytes_committed"])}
                ttl_ms: int | str = int(f["ttl_s"]) * 1000 if f["ttl_s"].isdigit() else ""
                # Round trip 2: the atomic switch.
                manifest = self._seal.seal({
                    "v": FORMAT_VERSION, "sid": sid, "tenant": old["tenant"], "gen": old["gen"] + 1,
                    "wid": wid, "fingerprint": fingerprint, "size": n, "hash": algo,
                    "parts": [[s, d.result()] for s, d in zip(sizes, digests, strict=True)],
                    "tokens": old["tokens"] if tokens is None else int(tokens),
                    "bytes_committed": (old["bytes_committed"] if bytes_committed is None
                                        else int(bytes_committed))})
                fields = {"manifest": json.dumps(manifest), "gen": str(manifest["gen"]),
                          "state_bytes": str(n), "fingerprint": fingerprint, "tenant": manifest["tenant"],
                          **_changed_fields(manifest["tokens"], manifest["bytes_committed"], extra)}
                args: list[Any] = [fence_arg, old_gen, wid, len(old_keys), len(new_keys), ttl_ms]
                for k, v in fields.items():
                    args += [k, v]
                res = self._run("commit", [hk, fk, lk, *old_keys, *new_keys], args)
                if _text(res[0]) != "ok":
                    self._raise_status(sid, res)
            except BaseException as e:
                for d in digests:
                    d.cancel()
                if not isinstance(e, redis.ConnectionError | redis.TimeoutError):
                    # Redis away or frozen: the parts expire (pending TTL); waiting for it to drop
                    # them would hold the caller another timeout.
                    self._discard(new_keys)
                raise
        meta = self._meta(sid, self._flat_to_dict(res[1]))[0]
        self._stats.save(time.perf_counter() - t0, n)
        return meta

    def _discard(self, keys: list[str]) -> None:
        """Best effort: drop the parts of a failed put now (they expire anyway)."""
        if not keys:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.unlink(k)
            pipe.execute()
        except redis.RedisError:
            pass

    def update(self, sid: str, *, tokens: int | None = None, bytes_committed: int | None = None,
               extra: dict[str, Any] | None = None, fence: int | None = None,
               ttl_s: int | None | Keep = KEEP, labels_only: bool = False) -> SessionMeta:
        self._check_id("session id", sid)
        if isinstance(ttl_s, int) and ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if labels_only and (tokens is not None or bytes_committed is not None or fence is not None):
            raise ValueError("labels_only changes extra and the TTL, nothing a writer owns")
        hk, fk, lk = self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)
        for _ in range(RETRIES):
            cur = self._read_fields(sid)
            meta, m = self._meta(sid, cur)  # a broken session is not updated, only replaced or deleted
            gen, parts = self._current_parts(sid, cur)
            m = m or {"v": FORMAT_VERSION, "sid": sid, "tenant": meta.tenant, "gen": 0, "wid": "",
                      "fingerprint": meta.fingerprint, "size": 0, "hash": self._checksum(), "parts": [],
                      "tokens": 0, "bytes_committed": 0}
            sealed = self._seal.seal({**m, "v": FORMAT_VERSION,
                                      "tokens": m["tokens"] if tokens is None else int(tokens),
                                      "bytes_committed": (m["bytes_committed"] if bytes_committed is None
                                                          else int(bytes_committed))})
            fields = {"manifest": json.dumps(sealed),
                      **_changed_fields(sealed["tokens"], sealed["bytes_committed"], extra)}
            if labels_only:
                del fields["updated"]  # the time of the last commit: labels and TTLs are not one
            ttl_ms: int | str = meta.ttl_s * 1000 if meta.ttl_s else ""
            if not isinstance(ttl_s, Keep):
                fields["ttl_s"] = "" if ttl_s is None else str(ttl_s)
                ttl_ms = "-1" if ttl_s is None else ttl_s * 1000
            # labels_only: no writer check (a lease's holder never writes extra or the TTL; the
            # generation guard still orders this update with its commits).
            args: list[Any] = ["*" if labels_only else "" if fence is None else str(fence), gen, ttl_ms]
            for k, v in fields.items():
                args += [k, v]
            with _redis_errors(sid):
                res = self._run("update", [hk, fk, lk, *parts], args)
            if _text(res[0]) == "ok":
                return self._meta(sid, self._flat_to_dict(res[1]))[0]
            if _text(res[0]) != "retry":
                self._raise_status(sid, res)
        raise LeaseConflictError(f"session {sid}: kept changing during update", sid=sid)

    def touch(self, sid: str) -> None:
        self._check_id("session id", sid)
        cur = self._read_fields(sid)
        ttl = cur["ttl_s"]
        if not ttl.isdigit():
            return
        _, parts = self._current_parts(sid, cur)
        with _redis_errors(sid):
            pipe = self._client.pipeline(transaction=False)
            for key in (self._hash_key(sid), self._fence_key(sid), *parts):
                pipe.pexpire(key, int(ttl) * 1000)
            pipe.execute()

    def get(self, sid: str, *, expected_fingerprint: str | None = None) -> tuple[bytes, SessionMeta]:
        self._check_id("session id", sid)
        t0 = time.perf_counter()
        for _ in range(RETRIES):
            meta, manifest = self._meta(sid, self._read_fields(sid))
            if manifest is None or meta.generation == 0:
                raise NoStateError(f"session {sid} has no state yet", sid=sid)
            if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
                self._stats.count("foreign")
                raise ForeignModelError(
                    f"session {sid} holds a state of model {manifest['fingerprint'][:16]}..., "
                    f"expected {expected_fingerprint[:16]}...", sid=sid)
            data = self._load_parts(sid, meta.generation, manifest)
            if data is None:
                continue  # a commit replaced this generation while we read it: read the new one
            self._stats.load(time.perf_counter() - t0, len(data))
            return data, meta
        raise LeaseConflictError(f"session {sid}: state kept changing while loading", sid=sid)

    def _load_parts(self, sid: str, gen: int, manifest: dict[str, Any]) -> bytes | None:
        """Fetch and verify one generation's parts; None if it was replaced meanwhile."""
        specs = manifest["parts"]
        keys = self._manifest_keys(sid, manifest)
        sizes = [int(p[0]) for p in specs]
        pool = self._executor()
        digests: dict[int, Future[str]] = {}

        def hash_part(i: int, part: bytes | None) -> None:
            if part is not None and len(part) == sizes[i]:
                digests[i] = pool.submit(part_digest, part, manifest["hash"])

        with _redis_errors(sid):
            parts = self._read_parts(keys, sizes, hash_part)
        for i, part in enumerate(parts):
            problem = None
            if part is None:
                with _redis_errors(sid):
                    if self.generation(sid) != gen:
                        return None
                problem = f"part {i} of generation {gen} is missing"
            elif len(part) != sizes[i]:
                problem = f"part {i} of generation {gen} has {len(part)} bytes, expected {sizes[i]}"
            elif digests[i].result() != specs[i][1]:
                problem = f"part {i} of generation {gen} fails its {manifest['hash']} checksum"
            if problem:
                for d in digests.values():
                    d.cancel()
                self._stats.count("corrupt")
                raise StateCorruptError(f"session {sid}: {problem}; the state is refused", sid=sid)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # type: ignore[arg-type]

    def meta(self, sid: str) -> SessionMeta:
        self._check_id("session id", sid)
        return self._meta(sid, self._read_fields(sid))[0]

    def generation(self, sid: str) -> int:
        self._check_id("session id", sid)
        with _redis_errors(sid):
            g = self._client.hget(self._hash_key(sid), "gen")
        if g is None:
            raise StateNotFoundError(f"session {sid} not found", sid=sid)
        return _int0(_text(g))

    def delete(self, sid: str, *, fence: int | None = None, tenant: str | None = None) -> None:
        """Also a session whose metadata is broken; ``tenant``: the index to drop it from (else the
        one its tenant field names)."""
        self._check_id("session id", sid)
        hk, fk, lk = self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)
        for _ in range(RETRIES):
            cur = self._read_fields(sid)
            gen, parts = self._current_parts(sid, cur)
            args = ["" if fence is None else str(fence), gen, self.settings.fence_retention_s * 1000]
            with _redis_errors(sid):
                res = self._run("delete", [hk, fk, lk, *parts], args)
                if _text(res[0]) == "ok":
                    for owner in {tenant, cur["tenant"]} - {None, ""}:
                        if ID_RE.fullmatch(owner or ""):
                            self._client.srem(self._index_key(owner or ""), sid)
                    return
            if _text(res[0]) != "retry":
                self._raise_status(sid, res)
        raise LeaseConflictError(f"session {sid}: kept changing during delete", sid=sid)

    def list(self, tenant: str) -> list[SessionMeta]:
        """A session whose metadata fails its checks is listed with ``broken`` set (and counted),
        so that it can be seen and deleted; it never hides the others."""
        self._check_id("tenant", tenant)
        with _redis_errors():
            sids = sorted(_text(s) for s in self._client.smembers(self._index_key(tenant)))
            rows: list[Any] = []
            if sids:
                pipe = self._client.pipeline(transaction=False)
                for sid in sids:
                    pipe.hmget(self._hash_key(sid), list(_META_FIELDS))
                    pipe.exists(self._pending_key(sid))
                rows = pipe.execute()
            out, stale = [], []
            for sid, values, pending in zip(sids, rows[::2], rows[1::2], strict=True):
                f = dict(zip(_META_FIELDS, map(_text, values), strict=True))
                if all(v is None for v in values):
                    if not pending:  # expired by its TTL, or an index write of a failed create
                        stale.append(sid)
                    continue
                try:
                    if not _claims(f, tenant):  # in this tenant's index, its owner unreadable
                        raise StateCorruptError(f"session {sid}: its tenant field and manifest are "
                                                "unreadable", sid=sid)
                    out.append(self._meta(sid, f)[0])
                except StateCorruptError as e:
                    self._stats.count("broken")
                    out.append(SessionMeta(id=sid, tenant=tenant, created=_float0(f["created"]),
                                           updated=_float0(f["updated"]), broken=e.message))
            if stale:
                self._client.srem(self._index_key(tenant), *stale)
        return sorted(out, key=lambda m: (m.created, m.id))

    def heartbeat(self, owner: str, ttl_ms: int) -> None:
        """Say that lease owner ``owner`` (named ``runtime-*``) is alive for another ``ttl_ms``."""
        with _redis_errors():
            self._client.set(self._alive_key(owner), "1", px=ttl_ms)

    def lease(self, sid: str, owner: str = "", ttl_ms: int | None = None,
              wait_ms: int = 0, reclaim: bool = False) -> RedisLease:
        """``reclaim``: a lease this same ``owner`` still holds is a leftover (a release lost with
        Redis, say) and is taken over; only for an owner that runs one operation per session."""
        self._check_id("session id", sid)
        ttl = int(ttl_ms or self.settings.lease_ttl_ms)
        owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        owner = "".join(c if c.isprintable() and not c.isspace() else "_" for c in owner)
        nonce = uuid.uuid4().hex
        deadline = time.monotonic() + wait_ms / 1000
        keys = [self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)]
        steal = ""
        while True:
            with _redis_errors(sid):
                res = self._run("acquire", keys, [nonce, owner, ttl, steal])
            status = _text(res[0])
            if status == "ok":
                return RedisLease(self, sid, owner, int(res[1]), ttl, nonce)
            if status != "held":
                self._raise_status(sid, res)
            value, left_ms = _text(res[1]), max(0, int(res[2]))
            holder = value.split(" ", 2)[2] if value.count(" ") >= 2 else ""
            if value != steal:
                if reclaim and holder == owner:
                    steal = value
                    continue
                gone_in = self._heartbeat_left_ms(holder)
                if gone_in == 0:  # its runtime is gone: the lease would only block until its TTL
                    steal = value
                    continue
                if gone_in is not None:
                    left_ms = min(left_ms, gone_in)
            left = deadline - time.monotonic()
            if left <= 0:
                self._stats.count("conflicts")
                fence_no = value.split(" ")[0]
                raise LeaseConflictError(
                    f"session {sid} is leased to {holder or '?'} (fence {fence_no}) for up to another "
                    f"{left_ms} ms", sid=sid, retry_after_ms=left_ms)
            steal = ""
            time.sleep(min(left, 0.02, max(left_ms, 1) / 1000))

    def _alive_key(self, owner: str) -> str:
        return f"{self._prefix}:alive:{{{owner}}}"

    def _heartbeat_left_ms(self, holder: str) -> int | None:
        """How long the heartbeat of lease holder ``holder`` has left (0: expired); None if the
        holder keeps no heartbeat."""
        if not holder.startswith(HEARTBEAT_OWNERS):
            return None
        with _redis_errors():
            return max(0, int(self._client.pttl(self._alive_key(holder))))

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except (redis.RedisError, OSError):
            return False

    @property
    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._close_client()

    def _close_client(self) -> None:
        try:
            self._client.close()
        except redis.RedisError:
            pass


def retry_on_reconnect() -> Retry:
    """Retry once, at once, only when the connection failed (not on a timeout)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def connect(url: str, *, cluster: bool = False, timeout_s: float | None = 30.0,
            **kwargs: Any) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` tuned for large values.

    Standalone clients retry a command whose connection failed once, at once (a pooled connection
    may have died with a server restart), then fail fast; the store's scripts are idempotent under
    such a retry. A timeout is not retried: a frozen Redis holds a request for ``timeout_s``, once.
    Cluster clients keep redis-py's retry policy, which also follows slot moves and fail-overs."""
    common: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  socket_read_size=SOCKET_READ_BYTES)
    common.update(kwargs)
    if cluster:
        return RedisCluster.from_url(url, **common)
    return redis.Redis.from_url(url, retry=retry_on_reconnect(), **common)
