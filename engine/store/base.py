"""The store interface: session metadata, leases, counters and the abstract :class:`StateStore`.

The store keeps opaque state bytes (the engine serialises states to safetensors) plus metadata. It
never interprets the bytes; it only guarantees that what ``get`` returns is, bit for bit, what one
committed ``put`` stored, made by the model whose fingerprint the caller expects.
"""

from __future__ import annotations

import abc
import bisect
import enum
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pydantic import BaseModel, Field

Buffer = bytes | bytearray | memoryview


class Keep(enum.Enum):
    """A field an update leaves as it is (where None is a value: no TTL)."""

    KEEP = "keep"


KEEP = Keep.KEEP


class SessionMeta(BaseModel):
    """What the store knows about a session, apart from the state bytes.

    ``generation`` is 0 until a state is committed, then grows by one with every commit (metadata
    updates leave it alone). ``created``/``updated`` are Unix seconds. ``extra`` is free-form JSON
    for the runtime. ``ttl_s``: the session expires after that long without a write."""

    id: str
    tenant: str
    created: float
    updated: float
    tokens: int = 0
    bytes_committed: int = 0
    state_bytes: int = 0
    fingerprint: str = ""
    generation: int = 0
    ttl_s: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    #: Set when the session's metadata fails its checks (only in a listing): why. Such a session
    #: serves nothing and can be deleted.
    broken: str | None = None


#: Upper bounds (seconds) of the latency buckets, Prometheus style; the last bucket is +Inf.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                        2.5, 5.0, 10.0)


@dataclass
class LatencyStats:
    """Count, sum, max and a fixed-bucket histogram of one operation, plus the bytes it moved.

    ``buckets[i]`` counts observations ``<= LATENCY_BUCKETS_S[i]`` but above the previous bound
    (not cumulative); the last entry counts the rest."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    def observe(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        self.bytes += nbytes
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1


@dataclass
class StoreStats:
    """Counters of one store object (this process), for the server's /metrics."""

    saves: LatencyStats = field(default_factory=LatencyStats)
    loads: LatencyStats = field(default_factory=LatencyStats)
    corrupt: int = 0  # loads refused: bad, missing or truncated part, unreadable manifest
    foreign: int = 0  # loads refused: fingerprint of another model
    conflicts: int = 0  # writes refused: lease held elsewhere, stale fence, concurrent commit
    broken: int = 0  # sessions listed as broken (metadata failing its checks)
    restarts: int = 0  # times the embedded server was found dead and started again


class StatsRecorder:
    """Thread-safe owner of a :class:`StoreStats`; hands out copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = StoreStats()

    def save(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._stats.saves.observe(seconds, nbytes)

    def load(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._stats.loads.observe(seconds, nbytes)

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + 1)

    def snapshot(self) -> StoreStats:
        with self._lock:
            s = self._stats
            return StoreStats(
                saves=LatencyStats(s.saves.count, s.saves.total_s, s.saves.max_s, s.saves.bytes,
                                   list(s.saves.buckets)),
                loads=LatencyStats(s.loads.count, s.loads.total_s, s.loads.max_s, s.loads.bytes,
                                   list(s.loads.buckets)),
                corrupt=s.corrupt, foreign=s.foreign, conflicts=s.conflicts, broken=s.broken,
                restarts=s.restarts)


class Lease(abc.ABC):
    """Exclusive right to write one session, until released or expired.

    ``fence`` is the fencing token: pass it to ``put``/``update``/``delete``. A write with a fence
    is accepted only if no lease on the session was granted after this one, so a writer that
    stalled past its TTL cannot overwrite the work of the next holder. Use as a context manager to
    release on exit."""

    sid: str
    owner: str
    fence: int
    ttl_ms: int

    @abc.abstractmethod
    def renew(self, ttl_ms: int | None = None) -> None:
        """Extend the lease; raises LeaseConflictError if it was lost (expired and taken, or
        expired while nobody took it: the holder must then acquire a new one)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the lease up now (no-op if it already expired or was taken)."""

    @property
    @abc.abstractmethod
    def held(self) -> bool:
        """True while Redis still records this lease (one round trip)."""

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class StateStore(abc.ABC):
    """Durable session states: one interface, backends on Redis (standalone, cluster, embedded).

    Writes of one session are single-writer through :meth:`lease`; every commit is atomic (a reader
    sees the previous or the new state, never a mix); every load is checked (part checksums, sizes,
    model fingerprint) and refused with a typed :class:`~.errors.StoreError` if anything is off."""

    @abc.abstractmethod
    def create(self, tenant: str, *, sid: str | None = None, fingerprint: str = "",
               ttl_s: int | None = None, extra: dict[str, Any] | None = None,
               data: Buffer | None = None, tokens: int | None = None, bytes_committed: int | None = None,
               max_sessions: int | None = None) -> SessionMeta:
        """Create a session (random hex id unless ``sid`` is given), optionally with a first state
        (and its counters).

        Raises SessionExistsError if ``sid`` is taken, TooManySessionsError if the tenant already
        holds ``max_sessions`` (counted atomically: concurrent creates never pass it). ``ttl_s``: the
        session expires after that many seconds without a write."""

    @abc.abstractmethod
    def owns(self, tenant: str, sid: str) -> bool:
        """Whether the session is in the tenant's index (even if its metadata is broken)."""

    @abc.abstractmethod
    def heartbeat(self, owner: str, ttl_ms: int) -> None:
        """Lease owner ``owner`` is alive for another ``ttl_ms``: a lease held by an owner whose
        heartbeat lapsed is taken over without waiting for its TTL."""

    @abc.abstractmethod
    def put(self, sid: str, data: Buffer, *, fingerprint: str, tokens: int | None = None,
            bytes_committed: int | None = None, extra: dict[str, Any] | None = None,
            fence: int | None = None) -> SessionMeta:
        """Commit ``data`` as the session's new state (a new generation) and return the new meta.

        Fields left None keep their value. Without ``fence`` the write is refused while someone
        holds the lease; with it, refused if a later lease was granted (LeaseConflictError)."""

    @abc.abstractmethod
    def update(self, sid: str, *, tokens: int | None = None, bytes_committed: int | None = None,
               extra: dict[str, Any] | None = None, fence: int | None = None,
               ttl_s: int | None | Keep = KEEP, labels_only: bool = False) -> SessionMeta:
        """Change metadata only (``extra`` is replaced, not merged); the generation is unchanged.
        ``ttl_s``: a new time-to-live from now, or None for none. ``labels_only``: only ``extra``
        and the TTL change, allowed while another writer holds the lease."""

    @abc.abstractmethod
    def touch(self, sid: str) -> None:
        """Restart the session's TTL (a sliding TTL: reads extend it); nothing without a TTL."""

    @abc.abstractmethod
    def get(self, sid: str, *, expected_fingerprint: str | None = None) -> tuple[bytes, SessionMeta]:
        """Load the committed state, verified. Raises StateNotFoundError, NoStateError,
        ForeignModelError (fingerprint differs from ``expected_fingerprint``) or StateCorruptError."""

    @abc.abstractmethod
    def meta(self, sid: str) -> SessionMeta:
        """Metadata of a session (StateNotFoundError if absent)."""

    @abc.abstractmethod
    def generation(self, sid: str) -> int:
        """Committed generation (one small read): a cached state of an older generation is stale."""

    @abc.abstractmethod
    def delete(self, sid: str, *, fence: int | None = None, tenant: str | None = None) -> None:
        """Delete the session and its state, also one whose metadata is broken (StateNotFoundError
        if absent; LeaseConflictError if another writer holds the lease)."""

    @abc.abstractmethod
    def list(self, tenant: str) -> list[SessionMeta]:
        """Sessions of one tenant, oldest first; one whose metadata is broken has ``broken`` set."""

    @abc.abstractmethod
    def lease(self, sid: str, owner: str = "", ttl_ms: int | None = None,
              wait_ms: int = 0, reclaim: bool = False) -> Lease:
        """Acquire the session's write lease, waiting up to ``wait_ms`` for the holder to let go.

        Raises LeaseConflictError if it stays taken, StateNotFoundError if there is no session."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True if the backend answers (for /ready)."""

    @property
    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of this store object's counters."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections (and stop the embedded server if this was its last client)."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
