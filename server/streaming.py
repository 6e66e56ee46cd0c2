"""Server-sent events, and the one loop every generation endpoint runs.

``EventStream`` differs from Starlette's StreamingResponse in two ways that matter here:
- it listens for the client's disconnect only once the request body has been read (an ingest sends
  its response while its body is still arriving; a listener calling ``receive()`` then would eat
  document bytes), and
- it always closes its event iterator in a ``finally`` (shielded), so the runtime generator under it
  is closed and the runtime cancels the work when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from atlas.engine.api import GeneratedToken
from atlas.engine.runtime import GenerationDone, Runtime
from atlas.engine.runtime.jobs import PromptLogprobs
from atlas.engine.sampling import SamplingParams, TokenLogprob
from atlas.engine.store import SessionMeta

from .errors import ApiError
from .metrics import Metrics

T = TypeVar("T")

#: Seconds past a generation's timeout before it is cancelled outright (the runtime ends it at its
#: timeout itself once it samples; this covers a request that never got so far).
TIMEOUT_GRACE_S = 5.0

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# JSON leaves these unescaped, but str.splitlines (and so httpx's iter_lines) ends a line at each:
# a generated U+2028 would cut a client's event in two. Escaped, every event is one line everywhere.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: Any) -> bytes:
    """One event: ``data: {json}`` on one line, and a blank line."""
    if isinstance(data, str):
        text = data
    else:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """A ``text/event-stream`` response over an async iterator of encoded events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], body_read: asyncio.Event | None = None,
                 headers: Mapping[str, str] | None = None, status_code: int = 200):
        self.events = events
        self.body_read = body_read  # set once the request body is consumed; None: already read
        self.status_code = status_code
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self._stream(send)
                finally:
                    tg.cancel_scope.cancel()

            async def watch() -> None:
                if self.body_read is not None:
                    await self.body_read.wait()
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # the client is gone: cancels stream(), which closes events

            tg.start_soon(stream)
            tg.start_soon(watch)

    async def _stream(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def while_connected(receive: Receive, work: Awaitable[T],
                          on_gone: Callable[[], None] | None = None) -> T:
    """`work` (the whole answer of a request that does not stream), cancelled when the client goes
    away: a client that timed out (and perhaps retries) must not leave its generations running.
    `on_gone` is called first (work in a thread cannot be cancelled: it stops where it checks a
    flag that `on_gone` sets). Call it once the request body is read: ``receive()`` then only
    reports the disconnect."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left (or this request was cancelled): stop the work
            if on_gone is not None:
                on_gone()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():  # nobody reads this answer; the status is for the access log
        raise ApiError("client_disconnected", "the client went away before the answer was ready")
    return task.result()


# -- generation --------------------------------------------------------------------------------------

@dataclass
class Token:
    id: int
    text: str
    index: int = 0  # the choice (SamplingParams.n)
    logprob: TokenLogprob | None = None  # when SamplingParams.logprobs asks for it


@dataclass
class Prompt:
    """The prompt's log-probabilities (SamplingParams.prompt_logprobs), before any token."""

    logprobs: list[TokenLogprob | None]


@dataclass
class Finished:
    finish_reason: str  # of the first choice
    prompt_tokens: int
    completion_tokens: int  # of all choices
    session: SessionMeta | None = None
    finish_reasons: list[str] = field(default_factory=list)  # one per choice

    def reason(self, index: int) -> str:
        return self.finish_reasons[index] if index < len(self.finish_reasons) else self.finish_reason


async def generation(runtime: Runtime, metrics: Metrics, sid: str | None, tenant: str, prompt: list[int],
                     params: SamplingParams, commit: bool, timeout_s: float
                     ) -> AsyncGenerator[Token | Prompt | Finished, None]:
    """Tokens (of every choice, interleaved; with the prompt's log-probabilities first when the
    params ask for them), then one Finished. Past ``timeout_s`` the runtime samples no more tokens
    and Finished says ``timeout`` (the text held back for a stop string sent, as at ``length``).
    Should the runtime not get there (a prompt still being read, a session still busy with another
    request), the work is cancelled ``TIMEOUT_GRACE_S`` later. Errors before the first token raise
    on the first ``__anext__`` (so a route can prime this to answer with a real status); closing
    this closes the runtime's generator, which cancels the work."""
    t0 = last = time.perf_counter()
    deadline = t0 + timeout_s + TIMEOUT_GRACE_S
    agen = runtime.generate(sid, tenant, prompt, params, commit=commit, timeout_s=timeout_s)
    n = 0
    reason = "cancelled"  # unless it ends otherwise: the caller closed this early
    try:
        while True:
            ev: GeneratedToken | GenerationDone | PromptLogprobs | None = None
            ended = False
            with anyio.move_on_after(max(0.0, deadline - time.perf_counter())):
                try:
                    ev = await agen.__anext__()
                except StopAsyncIteration:  # the runtime always ends with GenerationDone; be safe
                    ended = True
            if ended or ev is None:
                reason = "length" if ended else "timeout"
                yield Finished(reason, len(prompt), n, finish_reasons=[reason] * params.n)
                return
            now = time.perf_counter()
            if isinstance(ev, PromptLogprobs):
                yield Prompt(ev.entries)
                continue
            if isinstance(ev, GenerationDone):
                reason = ev.finish_reason
                yield Finished(ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, ev.session,
                               ev.finish_reasons or [ev.finish_reason])
                return
            (metrics.ttft if n == 0 else metrics.itl).observe(now - (t0 if n == 0 else last))
            last = now
            n += 1
            metrics.generation_tokens.inc()
            yield Token(ev.id, ev.text, ev.index, ev.logprob)
    except Exception:
        reason = "error"
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await agen.aclose()
        metrics.prompt_tokens.inc(len(prompt))
        metrics.request_success.labels(reason).inc()
        metrics.e2e.observe(time.perf_counter() - t0)


async def primed(agen: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """Run ``agen`` to its first item now (so errors before any output become an HTTP status), and
    return an iterator that yields that item and the rest. Closing it closes ``agen``."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = _EMPTY
    except BaseException:
        with anyio.CancelScope(shield=True):
            await agen.aclose()
        raise

    async def rest() -> AsyncGenerator[Any, None]:
        try:
            if first is _EMPTY:
                return
            yield first
            async for item in agen:
                yield item
        finally:
            with anyio.CancelScope(shield=True):
                await agen.aclose()

    return rest()


_EMPTY = object()
