"""OpenAI-compatible ``POST /v1/completions`` (the official ``openai`` client works unchanged).

Extension: ``session_id`` runs the prompt on a fork of that session (the session never changes);
without it the prompt starts from an empty state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter

from ..dependencies import MetricsDep, Services, ServicesDep, SettingsDep, TenantDep, session_id
from ..errors import ApiError, error_event
from ..schemas import Completion, CompletionChoice, CompletionRequest, Usage
from ..streaming import EventStream, Finished, generation, primed, sse
from .common import JSON_GEN_ERRORS, prompt_ids, sampling

router = APIRouter(tags=["openai"])

RESPONSES = {**JSON_GEN_ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _unsupported(name: str, why: str) -> ApiError:
    return ApiError("unsupported_parameter", f"{name}: {why}")


def _check(req: CompletionRequest, services: Services) -> str | list[int]:
    """Refuse what we would otherwise silently get wrong; the prompt as text or ids."""
    if req.model is not None and req.model != services.model_id:
        raise ApiError("model_not_found", f"model {req.model!r} is not served here; "
                       f"this server runs {services.model_id!r} (GET /v1/models)")
    if req.n != 1:
        raise _unsupported("n", "only n=1 is supported")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported")
    if req.echo:
        raise _unsupported("echo", "not supported")
    if req.logprobs is not None:
        raise _unsupported("logprobs", "not supported")
    if req.suffix:
        raise _unsupported("suffix", "not supported")
    if req.presence_penalty or req.frequency_penalty:
        raise _unsupported("presence_penalty/frequency_penalty", "penalties are not supported")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise _unsupported("prompt", "one prompt per request (n=1)")
        return prompt[0]
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


@router.post("/v1/completions", response_model=Completion, responses=RESPONSES)
async def completions(req: CompletionRequest, who: TenantDep, services: ServicesDep,
                      settings: SettingsDep, metrics: MetricsDep):
    """OpenAI's completions, streaming (``stream: true``, with ``stream_options.include_usage``) or
    not. ``finish_reason`` is ``stop``, ``length`` or ``timeout`` (ATLAS_REQUEST_TIMEOUT_S)."""
    prompt = _check(req, services)
    params = sampling(req, 16, settings)  # OpenAI's default max_tokens
    ids = prompt_ids(services.atlas, prompt, settings)
    sid = req.session_id
    if sid is not None:
        await services.runtime.get_session(session_id(sid), who)
    stream = await primed(generation(services.runtime, metrics, sid, who, ids, params, False,
                                     settings.request_timeout_s))
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if not req.stream:
        text: list[str] = []
        try:
            async for item in stream:
                if isinstance(item, Finished):
                    usage = Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                                  total_tokens=item.prompt_tokens + item.completion_tokens)
                    return Completion(id=cid, created=created, model=services.model_id, usage=usage, choices=[
                        CompletionChoice(text="".join(text), finish_reason=item.finish_reason)])
                text.append(item.text)
        finally:
            await stream.aclose()
        raise RuntimeError("generation ended without a result")  # pragma: no cover

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(text: str, finish_reason: str | None) -> bytes:
        body = {"id": cid, "object": "text_completion", "created": created, "model": services.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if not isinstance(item, Finished):
                    if item.text:
                        yield chunk(item.text, None)
                    continue
                yield chunk("", item.finish_reason)
                if include_usage:
                    usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                             "total_tokens": item.prompt_tokens + item.completion_tokens}
                    yield sse({"id": cid, "object": "text_completion", "created": created,
                               "model": services.model_id, "choices": [], "usage": usage})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            await stream.aclose()
        yield sse("[DONE]")

    return EventStream(events())
