"""Request and response bodies (pydantic); FastAPI turns them into the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from atlas.engine.session_file import (
    MAX_METADATA_BYTES,
    MAX_METADATA_KEYS,
    MAX_NAME_CHARS,
    MetadataValue,
    check_metadata,
    check_name,
)
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
    request_id: str | None = Field(None, description="The request's id (its X-Request-ID header).")


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
    sliding_ttl: bool = Field(False, description="Reads (any request on the session) restart its TTL.")
    name: str | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    broken: str | None = Field(None, description="Set (why) when the session's stored metadata fails "
                               "its checks: it serves nothing and can be deleted.")

    @classmethod
    def of(cls, meta: SessionMeta) -> SessionOut:
        x = meta.extra
        forked, name, labels = x.get("forked_from"), x.get("name"), x.get("metadata")
        return cls(id=meta.id, created=meta.created, updated=meta.updated, tokens=meta.tokens,
                   bytes_committed=meta.bytes_committed, state_bytes=meta.state_bytes,
                   generation=meta.generation, ttl_s=meta.ttl_s,
                   forked_from=forked if isinstance(forked, str) else None,
                   sliding_ttl=x.get("sliding_ttl") is True, name=name if isinstance(name, str) else None,
                   metadata=labels if isinstance(labels, dict) else {}, broken=meta.broken)


class SessionPatch(BaseModel):
    """Fields left out stay as they are; ``null`` removes a name or the TTL."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ttl_s: int | None = Field(None, ge=1, le=MAX_TTL_S, description="A new TTL from now; null: none.")
    sliding_ttl: bool | None = Field(None, description="Reads restart the TTL (default false).")
    name: Annotated[str | None, AfterValidator(check_name)] = Field(
        None, description=f"1 to {MAX_NAME_CHARS} printable characters; null removes it.")
    metadata: Annotated[dict[str, MetadataValue] | None, AfterValidator(
        lambda v: None if v is None else check_metadata(v))] = Field(
        None, description=f"Replaces the metadata: a flat object of at most {MAX_METADATA_KEYS} keys, "
                          f"{MAX_METADATA_BYTES} bytes as compact UTF-8 JSON; null or {{}} clears it.")


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]
    has_more: bool = False
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


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
    continuous_usage_stats: bool = Field(False, description="vLLM's; refused when true.")


class OpenAIFields(SamplingFields):
    """What OpenAI's completions and chat completions share (docs/openai.md lists every field, honoured
    or refused). Fields this server does not know are ignored as OpenAI's API does; the fields it
    knows and cannot honour (tools, guided decoding, beam search, ...) are kept in ``model_extra``
    only to be refused with 400 ``unsupported_parameter`` (``server/routes/common.py``)."""

    # "allow" keeps unknown fields in model_extra, where the routes look up the refused ones; none is
    # ever used. Strict as OpenAI's API: "5" is not a number.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128, description="Choices: forks of the one prompt state.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: over generated tokens.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: over generated tokens.")
    repetition_penalty: float = Field(1.0, ge=0.1, le=10.0, description="vLLM's: over prompt and "
                                      "generated tokens; positive logits divided, negative multiplied.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in "
                                                "[-100, 100], added to its logit.")
    user: str | None = None
    session_id: str | None = Field(None, description="Extension: run after this session's document, on a "
                                   "fork (the session does not change unless `commit`).")
    commit: bool = Field(False, description="Extension: append prompt and answer to the session "
                         "(needs session_id, one prompt, n = 1).")


class CompletionRequest(OpenAIFields):
    """OpenAI's legacy completions request."""

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either (several prompts).")
    best_of: int | None = Field(None, ge=1, le=128, description="Only equal to n.")
    echo: bool = Field(False, description="Prepend the prompt (and its log-probabilities with logprobs).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of each token, with "
                                 "this many alternatives.")


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: Text | None = None


class ChatMessageIn(BaseModel):
    # Roles and message fields beyond role/content (name, tool_call_id, ...) reach the template as given.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Text
    content: Text | list[TextContentPart] | None = None


class ChatCompletionRequest(OpenAIFields):
    """OpenAI's chat completions request."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name of max_tokens.")
    logprobs: bool = Field(False, description="Log-probabilities of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (with logprobs).")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; the first prompt token (echo) has null entries."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
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


# -- the playground's demo (routes/demo.py) ----------------------------------------------------------

class DemoFact(BaseModel):
    question: str = Field(description="The prompt asked right after the document (it starts a line).")
    truth: str = Field(description="The value a right answer starts with, e.g. 31415 or kitchen.")


class DemoDocument(BaseModel):
    task: str
    seed: int
    length: int = Field(description="Bytes asked for: the document and the first question together.")
    document: str = Field(description="The text to ingest, facts hidden in it; no question at the end.")
    facts: list[DemoFact]
    prose: str = Field(description="Where the text comes from: ATLAS_DEMO_PROSE's name, the built-in "
                                   "passage, or synthetic filler (passkey, multi_needle).")


class DemoAnswer(DemoFact):
    answer: str = Field(description="The greedy answer (at most 16 tokens, up to the first '.' or line end).")
    right: bool = Field(description="The answer's first number (or word, for places) is the truth.")


class DemoBaseline(BaseModel):
    model: str = Field(description="The baseline checkpoint's name.")
    fingerprint: str
    answers: list[DemoAnswer]
