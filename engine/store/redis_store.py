"""The Redis backend of the state store (standalone Redis, Redis Cluster, and the embedded server).

Key layout (``P`` = key prefix; every key of a session carries the hash tag ``{sid}``, so a
session lives in one Redis Cluster slot and its Lua scripts are legal there):

=========================  ======  ==========================================================
``P:{sid}:s``              hash    metadata fields, ``gen`` (committed generation), ``wid`` (write
                                   id of that generation), ``manifest`` (JSON, see below)
``P:{sid}:p:<wid>:<i>``    string  part ``i`` of the state bytes written by write ``wid``
``P:{sid}:lease``          string  ``"<fence> <nonce> <owner>"``, SET NX PX: the write lease
``P:{sid}:fence``          string  fencing counter, INCR on every lease grant
``P:tenant:{tenant}``      set     ids of a tenant's sessions (an index; stale ids are pruned)
=========================  ======  ==========================================================

A put takes two round trips. First, one pipeline reads the committed generation and manifest and
writes the parts under a fresh random write id with a pending TTL (straight from ``memoryview``
slices, no copy; parts are hashed in worker threads meanwhile). Then one commit script checks the
writer (fence equals the counter, or no lease is held when unfenced), checks that the committed
generation is still the one read before (no concurrent commit: lost-update guard), that every new
part exists, makes the parts permanent (or gives them the session TTL), bumps ``gen``, swaps
``wid`` + ``manifest`` + metadata in the hash, and unlinks the previous generation's parts.
Readers see the old or the new generation, never a mix; a crashed writer leaves only pending parts,
which expire. The manifest holds the format version, the write id, the model fingerprint, the total
size, the checksum algorithm and per-part ``[length, checksum]``; every load checks all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from .base import Buffer, Lease, SessionMeta, StateStore, StatsRecorder, StoreStats
from .errors import (
    ForeignModelError,
    LeaseConflictError,
    NoStateError,
    SessionExistsError,
    StateCorruptError,
    StateNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from .redis_scripts import SCRIPTS
from .settings import StoreSettings

FORMAT_VERSION = 1
#: Part checksums a manifest may name. xxh3 (XXH3-128, the default) runs at ~25 GB/s per core, so
#: checking costs far less than moving the bytes; crc32 at ~3 GB/s; sha256 at ~1.5 GB/s with SHA-NI,
#: for deployments that want a cryptographic hash. Parts are hashed in worker threads while other
#: parts travel over the socket. Loads use the algorithm the manifest names.
CHECKSUMS: dict[str, Callable[[memoryview | bytes], str]] = {
    "xxh3": xxhash.xxh3_128_hexdigest,
    "sha256": lambda b: hashlib.sha256(b).hexdigest(),
    "crc32": lambda b: f"{zlib.crc32(b):08x}",
}
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

_ID_RE = re.compile(r"[!-z|~]{1,200}")  # printable ASCII without spaces or braces (hash tags)
_META_FIELDS = ("tenant", "created", "updated", "tokens", "bytes_committed", "state_bytes",
                "fingerprint", "gen", "ttl_s", "extra")

def part_digest(part: memoryview | bytes, algorithm: str = "sha256") -> str:
    """Checksum of one part, as the manifest records it."""
    return CHECKSUMS[algorithm](part)


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

    def _index_key(self, tenant: str) -> str:
        return f"{self._prefix}:tenant:{{{tenant}}}"

    def _part_keys(self, sid: str, wid: str, n: int) -> list[str]:
        base = f"{self._base(sid)}:p:{wid}:"
        return [base + str(i) for i in range(n)]

    def _manifest_keys(self, sid: str, manifest: dict[str, Any] | None) -> list[str]:
        return self._part_keys(sid, manifest["wid"], len(manifest["parts"])) if manifest else []

    @staticmethod
    def _check_id(kind: str, value: str) -> None:
        if not isinstance(value, str) or not _ID_RE.fullmatch(value):
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

    def _meta_from_fields(self, sid: str, fields: dict[str, str]) -> SessionMeta:
        try:
            ttl = fields.get("ttl_s", "")
            return SessionMeta(
                id=sid, tenant=fields["tenant"], created=float(fields["created"]),
                updated=float(fields["updated"]), tokens=int(fields.get("tokens") or 0),
                bytes_committed=int(fields.get("bytes_committed") or 0),
                state_bytes=int(fields.get("state_bytes") or 0),
                fingerprint=fields.get("fingerprint", ""), generation=int(fields.get("gen") or 0),
                ttl_s=int(ttl) if ttl else None, extra=json.loads(fields.get("extra") or "{}"))
        except (KeyError, ValueError, TypeError) as e:
            self._stats.count("corrupt")
            raise StateCorruptError(f"session {sid}: unreadable metadata ({e})", sid=sid) from e

    @staticmethod
    def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
        return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}

    def _read_fields(self, sid: str, with_manifest: bool) -> dict[str, str]:
        names = _META_FIELDS + (("manifest",) if with_manifest else ())
        with _redis_errors(sid):
            values = self._client.hmget(self._hash_key(sid), list(names))
        if values[0] is None:  # tenant is always set on a live session
            raise StateNotFoundError(f"session {sid} not found", sid=sid)
        return {n: _text(v) for n, v in zip(names, values, strict=True)}

    def _parse_manifest(self, sid: str, raw: str, gen: int) -> dict[str, Any] | None:
        """The manifest of committed generation ``gen`` (None for 0), checked for shape."""
        if gen == 0:
            return None
        try:
            m = json.loads(raw)
            ok = (isinstance(m, dict) and m.get("v") == FORMAT_VERSION and m.get("hash") in CHECKSUMS
                  and isinstance(m.get("wid"), str) and _ID_RE.fullmatch(m["wid"]) is not None
                  and isinstance(m.get("fingerprint"), str) and isinstance(m.get("parts"), list)
                  and all(isinstance(p[1], str) and int(p[0]) >= 0 for p in m["parts"])
                  and sum(int(p[0]) for p in m["parts"]) == int(m["size"]))
        except (ValueError, TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            self._stats.count("corrupt")
            raise StateCorruptError(f"session {sid}: unreadable manifest of generation {gen}", sid=sid)
        return m

    def _current_parts(self, sid: str, fields: dict[str, str]) -> tuple[int, list[str]]:
        """Committed generation and its part keys (none if the manifest is unreadable)."""
        gen = int(fields.get("gen") or 0)
        try:
            return gen, self._manifest_keys(sid, self._parse_manifest(sid, fields.get("manifest", ""), gen))
        except StateCorruptError:
            return gen, []  # a broken state is replaced or deleted; its parts are left to leak

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
               data: Buffer | None = None) -> SessionMeta:
        sid = uuid.uuid4().hex if sid is None else sid
        self._check_id("session id", sid)
        self._check_id("tenant", tenant)
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = repr(time.time())
        fields = {"tenant": tenant, "created": now, "updated": now, "tokens": "0",
                  "bytes_committed": "0", "state_bytes": "0", "fingerprint": fingerprint, "gen": "0",
                  "wid": "", "ttl_s": "" if ttl_s is None else str(ttl_s),
                  "extra": json.dumps(extra or {}), "manifest": ""}
        args: list[Any] = [uuid.uuid4().hex, "" if ttl_s is None else ttl_s * 1000]
        for k, v in fields.items():
            args += [k, v]
        with _redis_errors(sid):
            # Index first: a crash in between leaves an index entry list() prunes, never a session
            # that list() cannot see.
            self._client.sadd(self._index_key(tenant), sid)
            res = self._run("create", [self._hash_key(sid), self._fence_key(sid)], args)
            if _text(res[0]) != "ok":
                self._raise_status(sid, res)
        if data is not None:
            return self.put(sid, data, fingerprint=fingerprint)
        return self._meta_from_fields(sid, fields)

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
        algo = self.settings.state_checksum
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
                        pipe.hmget(hk, ["gen", "manifest", "ttl_s"])
                    for i in idx:
                        pipe.set(new_keys[i], views[i], px=pending_ms)
                    res = pipe.execute()
                    if b == 0:
                        cur = res[0]
                old_gen, old_keys = self._current_parts(
                    sid, {"gen": _text(cur[0]), "manifest": _text(cur[1])})
                ttl_ms: int | str = int(_text(cur[2])) * 1000 if _text(cur[2]) else ""
                # Round trip 2: the atomic switch.
                manifest = {"v": FORMAT_VERSION, "wid": wid, "fingerprint": fingerprint, "size": n,
                            "hash": algo,
                            "parts": [[s, d.result()] for s, d in zip(sizes, digests, strict=True)]}
                fields = {"manifest": json.dumps(manifest), "state_bytes": str(n), "fingerprint": fingerprint,
                          **_changed_fields(tokens, bytes_committed, extra)}
                args: list[Any] = [fence_arg, old_gen, wid, len(old_keys), len(new_keys), ttl_ms]
                for k, v in fields.items():
                    args += [k, v]
                res = self._run("commit", [hk, fk, lk, *old_keys, *new_keys], args)
                if _text(res[0]) != "ok":
                    self._raise_status(sid, res)
            except BaseException:
                for d in digests:
                    d.cancel()
                self._discard(new_keys)
                raise
        meta = self._meta_from_fields(sid, self._flat_to_dict(res[1]))
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
               extra: dict[str, Any] | None = None, fence: int | None = None) -> SessionMeta:
        self._check_id("session id", sid)
        fields = _changed_fields(tokens, bytes_committed, extra)
        hk, fk, lk = self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)
        for _ in range(RETRIES):
            cur = self._read_fields(sid, with_manifest=True)
            gen, parts = self._current_parts(sid, cur)
            ttl_ms: int | str = int(cur["ttl_s"]) * 1000 if cur["ttl_s"] else ""
            args: list[Any] = ["" if fence is None else str(fence), gen, ttl_ms]
            for k, v in fields.items():
                args += [k, v]
            with _redis_errors(sid):
                res = self._run("update", [hk, fk, lk, *parts], args)
            if _text(res[0]) == "ok":
                return self._meta_from_fields(sid, self._flat_to_dict(res[1]))
            if _text(res[0]) != "retry":
                self._raise_status(sid, res)
        raise LeaseConflictError(f"session {sid}: kept changing during update", sid=sid)

    def get(self, sid: str, *, expected_fingerprint: str | None = None) -> tuple[bytes, SessionMeta]:
        self._check_id("session id", sid)
        t0 = time.perf_counter()
        for _ in range(RETRIES):
            fields = self._read_fields(sid, with_manifest=True)
            meta = self._meta_from_fields(sid, fields)
            gen = meta.generation
            if gen == 0:
                raise NoStateError(f"session {sid} has no state yet", sid=sid)
            manifest = self._parse_manifest(sid, fields["manifest"], gen)
            assert manifest is not None
            if manifest["fingerprint"] != meta.fingerprint:
                self._stats.count("corrupt")
                raise StateCorruptError(f"session {sid}: manifest and metadata disagree on the model",
                                        sid=sid)
            if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
                self._stats.count("foreign")
                raise ForeignModelError(
                    f"session {sid} holds a state of model {manifest['fingerprint'][:16]}..., "
                    f"expected {expected_fingerprint[:16]}...", sid=sid)
            data = self._load_parts(sid, gen, manifest)
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
        return self._meta_from_fields(sid, self._read_fields(sid, with_manifest=False))

    def generation(self, sid: str) -> int:
        self._check_id("session id", sid)
        with _redis_errors(sid):
            g = self._client.hget(self._hash_key(sid), "gen")
        if g is None:
            raise StateNotFoundError(f"session {sid} not found", sid=sid)
        return int(g)

    def delete(self, sid: str, *, fence: int | None = None) -> None:
        self._check_id("session id", sid)
        hk, fk, lk = self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)
        for _ in range(RETRIES):
            cur = self._read_fields(sid, with_manifest=True)
            gen, parts = self._current_parts(sid, cur)
            args = ["" if fence is None else str(fence), gen, self.settings.fence_retention_s * 1000]
            with _redis_errors(sid):
                res = self._run("delete", [hk, fk, lk, *parts], args)
                if _text(res[0]) == "ok":
                    self._client.srem(self._index_key(cur["tenant"]), sid)
                    return
            if _text(res[0]) != "retry":
                self._raise_status(sid, res)
        raise LeaseConflictError(f"session {sid}: kept changing during delete", sid=sid)

    def list(self, tenant: str) -> list[SessionMeta]:
        self._check_id("tenant", tenant)
        with _redis_errors():
            sids = sorted(_text(s) for s in self._client.smembers(self._index_key(tenant)))
            rows: list[Any] = []
            if sids:
                pipe = self._client.pipeline(transaction=False)
                for sid in sids:
                    pipe.hmget(self._hash_key(sid), list(_META_FIELDS))
                rows = pipe.execute()
            out, stale = [], []
            for sid, values in zip(sids, rows, strict=True):
                if values[0] is None or _text(values[0]) != tenant:
                    stale.append(sid)  # expired by its TTL, or an index write of a failed create
                    continue
                out.append(self._meta_from_fields(sid, dict(zip(_META_FIELDS, map(_text, values),
                                                                strict=True))))
            if stale:
                self._client.srem(self._index_key(tenant), *stale)
        return sorted(out, key=lambda m: (m.created, m.id))

    def lease(self, sid: str, owner: str = "", ttl_ms: int | None = None,
              wait_ms: int = 0) -> RedisLease:
        self._check_id("session id", sid)
        ttl = int(ttl_ms or self.settings.lease_ttl_ms)
        owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        owner = "".join(c if c.isprintable() and not c.isspace() else "_" for c in owner)
        nonce = uuid.uuid4().hex
        deadline = time.monotonic() + wait_ms / 1000
        keys = [self._hash_key(sid), self._fence_key(sid), self._lease_key(sid)]
        while True:
            with _redis_errors(sid):
                res = self._run("acquire", keys, [nonce, owner, ttl])
            status = _text(res[0])
            if status == "ok":
                return RedisLease(self, sid, owner, int(res[1]), ttl, nonce)
            if status != "held":
                self._raise_status(sid, res)
            left = deadline - time.monotonic()
            if left <= 0:
                self._stats.count("conflicts")
                holder = _text(res[1]).split(" ")
                raise LeaseConflictError(
                    f"session {sid} is leased to {' '.join(holder[2:]) or '?'} (fence {holder[0]}) "
                    f"for another {int(res[2])} ms", sid=sid, retry_after_ms=max(0, int(res[2])))
            time.sleep(min(left, 0.02, max(int(res[2]), 1) / 1000))

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


def connect(url: str, *, cluster: bool = False, timeout_s: float | None = 30.0,
            **kwargs: Any) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` tuned for large values.

    Standalone clients retry a failed command once, at once (a pooled connection may have died
    with a server restart), then fail fast; the store's scripts are idempotent under such a retry.
    Cluster clients keep redis-py's retry policy, which also follows slot moves and fail-overs."""
    common: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  socket_read_size=SOCKET_READ_BYTES)
    common.update(kwargs)
    if cluster:
        return RedisCluster.from_url(url, **common)
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **common)
