"""Session state store: opaque state bytes + metadata in Redis (external, cluster, or embedded).

See ``base.StateStore`` for the interface, ``redis_store`` for the key layout and commit protocol,
``embedded`` for the default server, ``cache.HotCache`` for the in-memory cache of live states.
"""

from .base import LATENCY_BUCKETS_S, LatencyStats, Lease, SessionMeta, StateStore, StoreStats
from .cache import CacheEntry, CacheStats, HotCache
from .embedded import EmbeddedStore
from .errors import (
    ForeignModelError,
    LeaseConflictError,
    NoStateError,
    SessionExistsError,
    SessionNotFoundError,
    StateCorruptError,
    StateNotFoundError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TooManySessionsError,
)
from .factory import open_store
from .redis_store import RedisLease, RedisStore, connect
from .settings import StoreSettings

__all__ = [
    "LATENCY_BUCKETS_S", "CacheEntry", "CacheStats", "EmbeddedStore", "ForeignModelError", "HotCache",
    "LatencyStats", "Lease", "LeaseConflictError", "NoStateError", "RedisLease", "RedisStore",
    "SessionExistsError", "SessionMeta", "SessionNotFoundError", "StateCorruptError", "StateNotFoundError",
    "StateStore", "StoreError", "StoreSettings", "StoreStats", "StoreFullError", "StoreUnavailableError",
    "TooManySessionsError", "connect", "open_store",
]
