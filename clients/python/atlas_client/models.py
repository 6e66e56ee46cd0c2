"""Typed results (pydantic): what the server's JSON and events mean, checked on arrival."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    # A newer server may add fields: an older client must keep working.
    model_config = ConfigDict(extra="ignore")


class Session(_Model):
    """A session's counters. ``bytes_committed`` is where an ingest resumes."""

    id: str
    created: float
    updated: float
    tokens: int
    bytes_committed: int
    state_bytes: int
    generation: int = 0
    ttl_s: int | None = None
    forked_from: str | None = None


class IngestProgress(_Model):
    """One progress report of an ingest. ``bytes_sent`` counts what left this client (ahead of
    ``bytes_committed`` by what is in flight), so a progress bar moves between server events."""

    session_id: str
    bytes_committed: int
    tokens: int
    tokens_per_s: float = 0.0
    done: bool = False
    bytes_sent: int = 0
    resumes: int = 0


class Token(_Model):
    """One generated token: its text (may be empty mid-character) and id (None from /v1/completions)."""

    text: str
    token: int | None = None


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateDone(_Model):
    """How a generation ended; ``session`` is the session after a committed exchange."""

    finish_reason: str
    usage: Usage | None = None
    session: Session | None = None
