"""OpenAI-compatible ``POST /v1/chat/completions``.

The messages become a prompt through the model's chat template (tokenizer_config.json's
``chat_template``, rendered as transformers does: engine/chat_template.py), or the plain template of
docs/openai.md for a model without one; from there it is a completion like any other, on the same
generation path as ``/v1/completions`` and the native generate route. Extensions ``session_id`` (the
chat runs after that session's document, on a fork) and ``commit`` (the rendered turn and the
answer are appended to the session).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from atlas.engine import Atlas
from atlas.engine.chat_template import ChatTemplateError, render_chat
from atlas.engine.sampling import TokenLogprob

from ..dependencies import MetricsDep, ServicesDep, SettingsDep, TenantDep
from ..errors import ApiError, error_event
from ..schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessageIn,
    ChatMessageOut,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from ..streaming import EventStream, Finished, Prompt, Token, sse, while_connected
from .common import prompt_ids, refuse_unsupported, sampling, token_text
from .completions import RESPONSES, check_model, merged, start

router = APIRouter(tags=["openai"])


def _message(m: ChatMessageIn, i: int) -> dict[str, Any]:
    """A message as the template sees it: content parts of type text joined with newlines (as vLLM
    does for templates that expect a string); any other part type is refused."""
    out = dict(m.model_extra or {}, role=m.role)
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text":
                raise ApiError("unsupported_parameter", f"messages[{i}].content: parts of type "
                               f"{part.type!r} are not supported (only text)")
            if part.text is None:
                raise ApiError("invalid_request", f"messages[{i}].content: a part of type 'text' "
                               "needs its `text`")
            texts.append(part.text)
        content = "\n".join(texts)
    out["content"] = content if content is not None else ""
    return out


def render(atlas: Atlas, req: ChatCompletionRequest) -> str:
    """The prompt text of the request's messages; 400 chat_template_error when the template fails."""
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    try:
        return render_chat(messages, atlas.chat_template, atlas.special_tokens)
    except ChatTemplateError as e:
        raise ApiError("chat_template_error", str(e)) from e


def _entry(atlas: Atlas, e: TokenLogprob) -> ChatTokenLogprob:
    top = [TopLogprob(token=token_text(atlas, t), logprob=lp, bytes=list(atlas.token_bytes(t)))
           for t, lp in e.top]
    return ChatTokenLogprob(token=token_text(atlas, e.id), logprob=e.logprob,
                            bytes=list(atlas.token_bytes(e.id)), top_logprobs=top)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(req: ChatCompletionRequest, request: Request, who: TenantDep,
                           services: ServicesDep, settings: SettingsDep, metrics: MetricsDep):
    """OpenAI's chat completions, streaming (``chat.completion.chunk``: the role first, then content,
    then each choice's finish_reason, then usage with ``stream_options.include_usage``) or not."""
    check_model(req, services)
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError("unsupported_parameter", "top_logprobs: only with logprobs: true")
    atlas = services.atlas
    asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    params = sampling(req, 128, settings, defaults=atlas.generation_defaults, max_tokens=asked,
                      vocab_size=atlas.config.vocab_size,
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    ids = prompt_ids(atlas, render(atlas, req), settings)
    streams = await start(services, metrics, settings, who, req.session_id, [ids], params, req.commit)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": services.model_id}
    if not req.stream:
        return await while_connected(request.receive,
                                     _whole(atlas, streams, head, params.n, bool(req.logprobs)))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return EventStream(_chunks(atlas, streams, head, params.n, include_usage))


async def _whole(atlas: Atlas, streams: list[Any], head: dict[str, Any], n: int,
                 logprobs: bool) -> ChatCompletion:
    """The answer sent whole: every choice's text (and log-probabilities), then usage."""
    texts = [""] * n
    entries: list[list[ChatTokenLogprob]] = [[] for _ in range(n)]
    done: Finished | None = None
    try:
        async for _, item in merged(streams):
            if isinstance(item, Token):
                texts[item.index] += item.text
                if item.logprob is not None:
                    entries[item.index].append(_entry(atlas, item.logprob))
            elif isinstance(item, Finished):
                done = item
    finally:
        await streams[0].aclose()
    assert done is not None  # a generation always ends with Finished
    usage = Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                  total_tokens=done.prompt_tokens + done.completion_tokens)
    return ChatCompletion(**head, usage=usage, choices=[
        ChatChoice(index=i, message=ChatMessageOut(content=texts[i]), finish_reason=done.reason(i),
                   logprobs=ChatLogprobs(content=entries[i]) if logprobs else None)
        for i in range(n)])


async def _chunks(atlas: Atlas, streams: list[Any], head: dict[str, Any], n: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The answer streamed: each choice's role first (as OpenAI sends it), then its content, then
    each choice's finish_reason, then usage if asked for; an error as the last event."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse(body)

    def choice(index: int, delta: dict[str, Any], logprobs: list[ChatTokenLogprob] | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
        lp = None if logprobs is None else {"content": [e.model_dump() for e in logprobs], "refusal": None}
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}

    try:
        for i in range(n):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        async for _, item in merged(streams):
            if isinstance(item, Token):
                logprobs = [_entry(atlas, item.logprob)] if item.logprob is not None else None
                if item.text or logprobs is not None:
                    yield chunk([choice(item.index, {"content": item.text}, logprobs)])
            elif isinstance(item, Finished):
                for i in range(n):
                    yield chunk([choice(i, {}, None, item.reason(i))])
                if include_usage:
                    yield chunk([], {"prompt_tokens": item.prompt_tokens,
                                     "completion_tokens": item.completion_tokens,
                                     "total_tokens": item.prompt_tokens + item.completion_tokens})
            elif isinstance(item, Prompt):  # not asked for here
                continue
    except Exception as e:
        yield sse(error_event(e))
    finally:
        await streams[0].aclose()
    yield sse("[DONE]")
