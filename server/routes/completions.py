"""OpenAI-compatible ``POST /v1/completions`` (the official ``openai`` client works unchanged).

Extensions: ``session_id`` runs the prompt after that session's document, on a fork (the session
never changes), and ``commit`` appends prompt and answer to it instead; without a session the prompt
starts from an empty state. ``logprobs`` with ``echo`` and ``max_tokens: 0`` scores a prompt
(loglikelihood evaluation: lm-evaluation-harness's ``local-completions`` sends exactly that).
docs/openai.md lists every field, honoured or refused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter

from atlas.engine import Atlas
from atlas.engine.sampling import SamplingParams, TokenLogprob

from ..dependencies import MetricsDep, Services, ServicesDep, SettingsDep, TenantDep, session_id
from ..errors import ApiError, error_event
from ..metrics import Metrics
from ..schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, OpenAIFields, Usage
from ..settings import ServerSettings
from ..streaming import EventStream, Finished, Prompt, Token, generation, primed, sse
from .common import JSON_GEN_ERRORS, prompt_ids, refuse_unsupported, sampling, text_offsets, token_text

router = APIRouter(tags=["openai"])

RESPONSES = {**JSON_GEN_ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}

#: Prompts one request may carry (each runs as its own generation, all at once).
MAX_PROMPTS = 64

Item = Token | Prompt | Finished


def check_model(req: OpenAIFields, services: Services) -> None:
    if req.model is not None and req.model != services.model_id:
        raise ApiError("model_not_found", f"model {req.model!r} is not served here; "
                       f"this server runs {services.model_id!r} (GET /v1/models)")


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return [[]]
    if isinstance(prompt[0], int):
        return [[int(t) for t in prompt if isinstance(t, int)]]
    prompts: list[str | list[int]] = [p if isinstance(p, str) else [int(t) for t in p]
                                      for p in prompt if isinstance(p, str | list)]
    if len(prompts) > MAX_PROMPTS:
        raise ApiError("unsupported_parameter", f"prompt: at most {MAX_PROMPTS} prompts per request")
    return prompts


async def start(services: Services, metrics: Metrics, settings: ServerSettings, who: str,
                sid: str | None, prompts: Sequence[list[int]], params: SamplingParams,
                commit: bool) -> list[AsyncGenerator[Item, None]]:
    """One generation per prompt, each primed (an error before any output is an HTTP status); if
    one fails, those already started are closed."""
    if sid is not None:
        await services.runtime.get_session(session_id(sid), who)
    streams: list[AsyncGenerator[Item, None]] = []
    try:
        for ids in prompts:
            streams.append(await primed(generation(services.runtime, metrics, sid, who, ids, params, commit,
                                                   settings.request_timeout_s)))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


async def merged(streams: Sequence[AsyncGenerator[Item, None]]) -> AsyncGenerator[tuple[int, Item], None]:
    """The items of several generations as they come, with the index of the stream of each."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Item | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[Item, None]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as e:  # handed to the reader
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, got = await queue.get()
            if got is None:
                left -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield i, got
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


@dataclass
class _Choice:
    """What one choice has so far: its text and, when asked, its log-probability entries."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, atlas: Atlas, entries: Sequence[TokenLogprob | None], ids: Sequence[int],
            offsets: Sequence[int]) -> CompletionLogprobs:
        """Entries for `ids` (None: the first prompt token, which nothing predicts), kept and returned."""
        part = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=list(offsets))
        for tok, e in zip(ids, entries, strict=True):
            part.tokens.append(token_text(atlas, tok))
            part.token_logprobs.append(None if e is None else e.logprob)
            part.top_logprobs.append(None if e is None else {token_text(atlas, t): lp for t, lp in e.top})
        self.tokens += part.tokens
        self.token_logprobs += part.token_logprobs
        self.top_logprobs += part.top_logprobs
        self.text_offset += part.text_offset
        return part

    def logprobs(self) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs,
                                  top_logprobs=self.top_logprobs, text_offset=self.text_offset)


@router.post("/v1/completions", response_model=Completion, responses=RESPONSES)
async def completions(req: CompletionRequest, who: TenantDep, services: ServicesDep,
                      settings: SettingsDep, metrics: MetricsDep):
    """OpenAI's completions, streaming (``stream: true``, with ``stream_options.include_usage``) or
    not, with ``n`` choices per prompt (choice ``i`` of prompt ``p`` has index ``p * n + i``).
    ``finish_reason`` is ``stop``, ``length`` or ``timeout`` (ATLAS_REQUEST_TIMEOUT_S)."""
    check_model(req, services)
    refuse_unsupported(req)
    atlas = services.atlas
    texts = _prompts(req)
    if req.commit and len(texts) != 1:
        raise ApiError("unsupported_parameter", "commit: only with one prompt")
    scored = req.echo and req.logprobs is not None
    params = sampling(req, 16, settings, vocab_size=atlas.config.vocab_size,  # 16: OpenAI's default
                      logprobs=req.logprobs, prompt_logprobs=req.logprobs if scored else None)
    prompts = [prompt_ids(atlas, p, settings) for p in texts]
    # The text each prompt's choices start with when echoed: as sent, or decoded from its ids.
    echoes = [(p if isinstance(p, str) else text_offsets(atlas, ids)[0], ids) if req.echo else ("", ids)
              for p, ids in zip(texts, prompts, strict=True)]
    streams = await start(services, metrics, settings, who, req.session_id, prompts, params, req.commit)
    cid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
    choices = [_Choice() for _ in range(len(prompts) * n)]
    want_logprobs = req.logprobs is not None

    def echo(p: int, entries: Sequence[TokenLogprob | None] | None) -> list[tuple[int, str, Any]]:
        """The prompt at the head of each of its choices: (index, text, log-probabilities)."""
        text, ids = echoes[p]
        out = []
        for i in range(p * n, (p + 1) * n):
            part = None
            if entries is not None:
                part = choices[i].add(atlas, entries, ids, text_offsets(atlas, ids)[1])
            choices[i].text += text
            out.append((i, text, part))
        return out

    def token(p: int, item: Token) -> tuple[int, str, Any]:
        i = p * n + item.index
        c = choices[i]
        part = None
        if want_logprobs and item.logprob is not None:
            part = c.add(atlas, [item.logprob], [item.id], [len(c.text)])
        c.text += item.text
        return i, item.text, part

    usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    reasons: dict[int, str] = {}

    def finished(p: int, item: Finished) -> list[int]:
        usage.prompt_tokens += item.prompt_tokens
        usage.completion_tokens += item.completion_tokens
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        for i in range(n):
            reasons[p * n + i] = item.reason(i)
        return list(range(p * n, (p + 1) * n))

    if not req.stream:
        try:
            if req.echo and not scored:
                for p in range(len(prompts)):
                    echo(p, None)
            async for p, item in merged(streams):
                if isinstance(item, Prompt):
                    echo(p, item.logprobs)
                elif isinstance(item, Token):
                    token(p, item)
                else:
                    finished(p, item)
        finally:
            for s in streams:
                await s.aclose()
        return Completion(id=cid, created=created, model=services.model_id, usage=usage, choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=reasons.get(i, "length"),
                             logprobs=c.logprobs() if want_logprobs else None)
            for i, c in enumerate(choices)])

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> bytes:
        body: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": services.model_id,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                         "logprobs": logprobs.model_dump() if logprobs is not None else None}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    async def events() -> AsyncIterator[bytes]:
        try:
            if req.echo and not scored:
                for p in range(len(prompts)):
                    for i, text, part in echo(p, None):
                        yield chunk(i, text, part, None)
            async for p, item in merged(streams):
                if isinstance(item, Prompt):
                    for i, text, part in echo(p, item.logprobs):
                        yield chunk(i, text, part, None)
                elif isinstance(item, Token):
                    i, text, part = token(p, item)
                    if text or part is not None:
                        yield chunk(i, text, part, None)
                else:
                    for i in finished(p, item):
                        yield chunk(i, "", None, reasons[i])
            if include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": created,
                           "model": services.model_id, "choices": [], "usage": usage.model_dump()})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            for s in streams:
                await s.aclose()
        yield sse("[DONE]")

    return EventStream(events())
