"""Request and response bodies (pydantic); FastAPI turns them into the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from atlas.engine.store import SessionMeta


def _utf8(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800), which are not text: refuse them here (422)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from e
    return text


Text = Annotated[str, AfterValidator(_utf8)]

MAX_TTL_S = 10 * 365 * 24 * 3600
SEED_MAX = (1 << 63) - 1


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. session_not_found.")
    message: str


class ErrorBody(BaseModel):
    """Every failure, whatever its status."""

    error: ErrorDetail


# -- sessions --------------------------------------------------------------------------------------

class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "60" for 60: see GenerateRequest

    ttl_s: int | None = Field(None, ge=1, le=MAX_TTL_S,
                              description="The session expires after this many seconds without a write.")


class SessionOut(BaseModel):
    object: Literal["session"] = "session"
    id: str
    created: float = Field(description="Unix seconds.")
    updated: float = Field(description="Unix seconds of the last commit.")
    tokens: int = Field(description="Tokens the session has read (document, prompts, answers).")
    bytes_committed: int = Field(description="Document bytes ingested and committed: resume from here.")
    state_bytes: int = Field(description="Bytes of the stored state (the same for any length).")
    generation: int = Field(description="Commit counter of the stored state.")
    ttl_s: int | None = None
    forked_from: str | None = None

    @classmethod
    def of(cls, meta: SessionMeta) -> SessionOut:
        return cls(id=meta.id, created=meta.created, updated=meta.updated, tokens=meta.tokens,
                   bytes_committed=meta.bytes_committed, state_bytes=meta.state_bytes,
                   generation=meta.generation, ttl_s=meta.ttl_s, forked_from=meta.extra.get("forked_from"))


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]


class IngestEvent(BaseModel):
    """One server-sent event of an ingest (``data: {json}``); the last has ``done: true``."""

    session_id: str
    bytes_committed: int
    tokens: int
    tokens_per_s: float
    done: bool = False


# -- sampling ----------------------------------------------------------------------------------------

StopString = Annotated[Text, Field(min_length=1, max_length=256)]


class SamplingFields(BaseModel):
    """What both generation endpoints share; ranges as in engine.sampling.SamplingParams."""

    max_tokens: int | None = Field(None, ge=0, description="Default 128 (completions: 16), at most "
                                   "ATLAS_MAX_TOKENS.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 (or below 0.001): greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: no limit.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Annotated[list[StopString], Field(max_length=16)] | StopString | None = Field(
        None, description="Stop strings (not included in the text).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class GenerateRequest(SamplingFields):
    """Strict types: a string is not a number nor a boolean (``"commit": "yes"``, ``"max_tokens":
    "5"`` are 422); an integer is a number (``"temperature": 0``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text = Field("", description="Text read after the session's state, before sampling.")
    commit: bool = Field(False, description="Append prompt and answer to the session (default: a fork).")


class TokenEvent(BaseModel):
    text: str = Field(description="Text this token completes (may be empty).")
    token: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateDoneEvent(BaseModel):
    done: Literal[True] = True
    finish_reason: str = Field(description="stop, length, timeout or cancelled.")
    usage: Usage
    session: SessionOut | None = Field(None, description="The session after a committed exchange.")


# -- OpenAI --------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """OpenAI's legacy completions request; unknown fields are ignored, known unsupported ones
    (n > 1, echo, logprobs, best_of, suffix) are refused with 400."""

    model_config = ConfigDict(extra="ignore", strict=True)  # as OpenAI's API: "5" is not a number

    model: str | None = None
    prompt: Text | list[Text] | list[int] = Field(description="Text, one-element list of text, or token ids.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    session_id: str | None = Field(None, description="Extension: run on a fork of this session.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "atlas"
    fingerprint: str | None = None
    # Beyond OpenAI's model object: what the model costs (Atlas.parameters, .weight_bytes, .state_bytes).
    parameters: int | None = Field(None, description="Parameters of the model (a tied embedding once).")
    weight_bytes: int | None = Field(None, description="Bytes of the weights in memory, in `dtype`.")
    dtype: str | None = Field(None, description="Dtype of the weights and activations (the session "
                                                "state is fp32 whatever it is).")
    state_bytes: int | None = Field(None, description="Bytes of one session's saved state, the same "
                                                      "after any number of tokens.")
    vocab_size: int | None = None
    context: Literal["unbounded"] = Field(
        "unbounded", description="Tokens a session can read: no limit, the state has a fixed size.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str | None = None
