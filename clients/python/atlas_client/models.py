"""Typed results (pydantic): what the server's JSON and events mean, checked on arrival."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: A session metadata value: the server keeps a flat JSON object of these.
MetadataValue = str | int | float | bool | None


class _Model(BaseModel):
    # A newer server may add fields: an older client must keep working.
    model_config = ConfigDict(extra="ignore")


class Session(_Model):
    """A session's counters and labels. ``bytes_committed`` is where an ingest resumes; ``broken``
    says why, when the server found the session's stored metadata damaged (it serves nothing then,
    and can be deleted)."""

    id: str
    created: float
    updated: float
    tokens: int
    bytes_committed: int
    state_bytes: int
    generation: int = 0
    ttl_s: int | None = None
    forked_from: str | None = None
    sliding_ttl: bool = False
    name: str | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    broken: str | None = None


class SessionPage(_Model):
    """One page of ``GET /v1/sessions``: pass ``next_cursor`` back for the next (None: the last)."""

    data: list[Session]
    has_more: bool = False
    next_cursor: str | None = None


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


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    """OpenAI's ``chat.completion`` (``POST /v1/chat/completions`` without streaming); ``text`` is
    the answer."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None
