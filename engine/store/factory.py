"""Pick the store backend from settings."""

from __future__ import annotations

from .base import StateStore
from .settings import StoreSettings


def open_store(settings: StoreSettings | None = None) -> StateStore:
    """The store the settings ask for: the embedded server when ``redis_url`` is None, else
    Redis at ``redis_url`` (Redis Cluster if ``redis_cluster``). Settings default to ``ATLAS_*``."""
    settings = settings or StoreSettings()
    if settings.redis_url is None:
        from .embedded import EmbeddedStore

        return EmbeddedStore(settings)
    from .redis_store import RedisStore

    return RedisStore.from_settings(settings)
