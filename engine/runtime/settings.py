"""Runtime settings (ATLAS_* environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATLAS_", extra="ignore")

    #: Sessions decoded together in one step.
    max_batch: int = Field(64, ge=1)
    #: Chunks of each ingest fed per step: prefill is cut on chunk boundaries so that a long ingest
    #: never holds the device for long and decoding sessions keep getting their tokens.
    ingest_chunks_per_step: int = Field(8, ge=1)
    #: Requests admitted at once (running or waiting); beyond it new work is refused (HTTP 429).
    max_requests: int = Field(256, ge=1)
    #: Bytes an ingest may buffer ahead of the device before its reader waits (flow control).
    ingest_buffer_bytes: int = Field(1 << 20, ge=1)
    #: An ingest saves its session to the store every this many tokens (and at its end).
    checkpoint_tokens: int = Field(1 << 16, ge=1)
    #: Lease time-to-live for writers; renewed while the work runs.
    lease_ttl_ms: int = Field(30_000, ge=100)
    #: The runtime's heartbeat in the store: a lease held by a runtime silent for 3 heartbeats
    #: (it crashed) is taken over by the next writer instead of blocking until its TTL.
    heartbeat_ms: int = Field(1_000, ge=50)
