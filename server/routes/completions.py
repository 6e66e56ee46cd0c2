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

import anyio
from fastapi import APIRouter, Request

from atlas.engine import Atlas
from atlas.engine.sampling import SamplingParams, TokenLogprob

from ..dependencies import MetricsDep, Services, ServicesDep, SettingsDep, TenantDep, session_id
from ..errors import ApiError, error_event
from ..metrics import Metrics
from ..schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, OpenAIFields, Usage
from ..settings import ServerSettings
from ..streaming import EventStream, Finished, Prompt, Token, generation, primed, sse, while_connected
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
        # Shielded (a client that went away cancels this scope), and each pump stopped before its
        # stream is closed: closing a generator that a pump is still iterating raises.
        with anyio.CancelScope(shield=True):
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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


#: What a completions stream says next: (choice index, text, its log-probabilities, finish reason).
Piece = tuple[int, str, CompletionLogprobs | None, str | None]


class _Run:
    """One completions request's choices, filled as its streams (one per prompt) come in."""

    def __init__(self, atlas: Atlas, echoes: list[tuple[str, list[int]]], n: int, want_logprobs: bool):
        self.atlas, self.echoes, self.n, self.want_logprobs = atlas, echoes, n, want_logprobs
        self.choices = [_Choice() for _ in range(len(echoes) * n)]
        self.usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        self.reasons: dict[int, str] = {}

    def echo(self, p: int, entries: Sequence[TokenLogprob | None] | None) -> list[Piece]:
        """The prompt at the head of each of its choices."""
        text, ids = self.echoes[p]
        out: list[Piece] = []
        for i in range(p * self.n, (p + 1) * self.n):
            part = None
            if entries is not None:
                part = self.choices[i].add(self.atlas, entries, ids, text_offsets(self.atlas, ids)[1])
            self.choices[i].text += text
            out.append((i, text, part, None))
        return out

    def token(self, p: int, item: Token) -> list[Piece]:
        i = p * self.n + item.index
        c = self.choices[i]
        part = None
        if self.want_logprobs and item.logprob is not None:
            part = c.add(self.atlas, [item.logprob], [item.id], [len(c.text)])
        c.text += item.text
        return [(i, item.text, part, None)] if item.text or part is not None else []

    def finished(self, p: int, item: Finished) -> list[Piece]:
        u = self.usage
        u.prompt_tokens += item.prompt_tokens
        u.completion_tokens += item.completion_tokens
        u.total_tokens = u.prompt_tokens + u.completion_tokens
        for i in range(self.n):
            self.reasons[p * self.n + i] = item.reason(i)
        return [(i, "", None, self.reasons[i]) for i in range(p * self.n, (p + 1) * self.n)]

    async def pieces(self, streams: list[AsyncGenerator[Any, None]],
                     echo_first: bool) -> AsyncIterator[Piece]:
        """Everything the choices receive, in order. `echo_first`: echo the prompts' text at once
        (echo without log-probabilities; with them, the prompt comes scored from its stream)."""
        if echo_first:
            for p in range(len(self.echoes)):
                for piece in self.echo(p, None):
                    yield piece
        async for p, item in merged(streams):
            got = (self.echo(p, item.logprobs) if isinstance(item, Prompt) else
                   self.token(p, item) if isinstance(item, Token) else self.finished(p, item))
            for piece in got:
                yield piece

    def completion(self, cid: str, created: int, model: str) -> Completion:
        return Completion(id=cid, created=created, model=model, usage=self.usage, choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=self.reasons.get(i, "length"),
                             logprobs=c.logprobs() if self.want_logprobs else None)
            for i, c in enumerate(self.choices)])


@router.post("/v1/completions", response_model=Completion, responses=RESPONSES)
async def completions(req: CompletionRequest, request: Request, who: TenantDep, services: ServicesDep,
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
    params = sampling(req, 16, settings, defaults=atlas.generation_defaults,  # 16: OpenAI's default
                      vocab_size=atlas.config.vocab_size,
                      logprobs=req.logprobs, prompt_logprobs=req.logprobs if scored else None)
    prompts = [prompt_ids(atlas, p, settings) for p in texts]
    # The text each prompt's choices start with when echoed: as sent, or decoded from its ids.
    echoes = [(p if isinstance(p, str) else text_offsets(atlas, ids)[0], ids) if req.echo else ("", ids)
              for p, ids in zip(texts, prompts, strict=True)]
    streams = await start(services, metrics, settings, who, req.session_id, prompts, params, req.commit)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    run = _Run(atlas, echoes, params.n, req.logprobs is not None)
    pieces = run.pieces(streams, echo_first=req.echo and not scored)

    if not req.stream:
        async def answer() -> Completion:
            try:
                async for _ in pieces:
                    pass
            finally:
                for st in streams:
                    await st.aclose()
            return run.completion(cid, created, services.model_id)

        return await while_connected(request.receive, answer())

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "text_completion", "created": created, "model": services.model_id}

    async def events() -> AsyncIterator[bytes]:
        try:
            async for i, text, part, finish_reason in pieces:
                body: dict[str, Any] = {**head, "choices": [{
                    "index": i, "text": text, "finish_reason": finish_reason,
                    "logprobs": part.model_dump() if part is not None else None}]}
                if include_usage:
                    body["usage"] = None
                yield sse(body)
            if include_usage:
                yield sse({**head, "choices": [], "usage": run.usage.model_dump()})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            for st in streams:
                await st.aclose()
        yield sse("[DONE]")

    return EventStream(events())
