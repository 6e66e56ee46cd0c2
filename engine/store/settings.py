"""Store settings, read from ``ATLAS_*`` environment variables.

``ATLAS_REDIS_URL`` unset means the embedded store: a Redis server the project starts itself, with
its data (RDB + append-only file) in ``ATLAS_DATA_DIR`` (default ``./data``, relative to the working
directory, so a checkout or a container's workdir keeps its sessions next to it; the repository's
``.gitignore`` already ignores ``/data/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class StoreSettings(BaseSettings):
    """Where and how session states are stored. Every field has an ``ATLAS_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="ATLAS_", extra="ignore")

    #: External Redis (``redis://``, ``rediss://`` or ``unix://`` URL). None: embedded server.
    redis_url: str | None = None
    #: Treat ``redis_url`` as one seed node of a Redis Cluster.
    redis_cluster: bool = False
    #: Directory of the embedded server's data files (and other local files of the project).
    data_dir: Path = Path("data")
    #: States are split into parts of at most this many bytes (Redis caps a value at 512 MB).
    #: 4 MiB: redis-py parses many mid-sized replies faster than one huge one, and checksums of
    #: some parts overlap the transfer of others (see bench/store.py); 512 MB is 128 keys.
    part_bytes: int = Field(4 * MiB, ge=1, le=256 * MiB)
    #: Default lease time-to-live; a writer renews before it runs out.
    lease_ttl_ms: int = Field(30_000, ge=10)
    #: Checksum of each part. xxh3 (XXH3-128, default) detects the corruption the store guards
    #: against (flipped bytes, truncated or mixed-up parts) at ~25 GB/s, so saves and loads stay near
    #: raw SET/GET speed; sha256 also resists deliberate tampering; crc32 needs no extra package.
    #: Each manifest names its algorithm, so changing this never breaks stored states.
    state_checksum: Literal["xxh3", "sha256", "crc32", "blake2b"] = "xxh3"
    #: Key of the manifests' MAC (engine/store/integrity.py). Set, a state whose manifest is not
    #: sealed with it (or an old key) is refused, and parts are checked with a cryptographic hash
    #: (blake2b, or sha256 if chosen above): whoever can write to Redis cannot forge a served state.
    state_key: SecretStr | None = None
    #: Earlier keys, comma-separated, still accepted on reads while sessions are rewritten (rotation).
    state_keys_old: SecretStr | None = None
    #: Byte budget of the hot cache of live states (device memory).
    cache_bytes: int = Field(2 * GiB, ge=0)
    #: Prefix of every key, so several deployments (or tests) can share one Redis.
    key_prefix: str = "atlas"
    #: fsync policy of the embedded server's append-only file. ``always``: every commit is written
    #: and fsynced before its reply, so no crash loses anything acknowledged. ``everysec`` fsyncs
    #: in the background once a second, and while one is slow Redis holds back the write itself
    #: (up to 2 s) but not the replies: a crash, even of the server process alone, can lose about
    #: the last 2 s of acknowledged commits.
    embedded_appendfsync: Literal["always", "everysec", "no"] = "always"
    #: Parts of a put that never commits (writer crashed) expire after this many seconds.
    pending_ttl_s: int = Field(3600, ge=1)
    #: A deleted session's fencing counter is kept this long, so a stale writer stays fenced off
    #: even if the same id is created again.
    fence_retention_s: int = Field(7 * 24 * 3600, ge=1)
    #: Seconds to wait for Redis on connect and on each command (None: wait forever).
    socket_timeout_s: float | None = Field(30.0, gt=0)

    @field_validator("key_prefix")
    @classmethod
    def _no_braces(cls, v: str) -> str:
        """Braces would change the Redis Cluster hash tag of every key."""
        if not v or "{" in v or "}" in v or any(c.isspace() for c in v):
            raise ValueError("key_prefix must be non-empty, without braces or spaces")
        return v
