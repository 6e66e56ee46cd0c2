"""``AtlasClient`` (sync) and ``AsyncAtlasClient``: the server's HTTP API as typed Python calls.

Both retry what is safe to retry by themselves: a 429 / 503 answer (the server did nothing) and a
connection that could not be opened, with exponential backoff that honours ``Retry-After``. An
ingest also survives a connection dropped mid-document: it asks the session for its
``bytes_committed`` and sends the rest from there (the server skips bytes it already has), so the
result is the session an uninterrupted upload would have made.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from ._common import DEFAULT_URL, IngestSource, Source, backoff_s, sampling_body, sse_data
from .errors import RETRYABLE_CODES, AtlasError, Busy, Unreachable, error_from_body, error_from_response
from .models import GenerateDone, IngestProgress, Session, Token, Usage

ProgressCallback = Callable[[IngestProgress], None]


def _settings(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = (url or os.environ.get("ATLAS_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("ATLAS_API_KEY")
    return url, ({"Authorization": f"Bearer {key}"} if key else {})


def _sid(session: str | Session) -> str:
    return session.id if isinstance(session, Session) else session


def _retryable(e: AtlasError) -> bool:
    return isinstance(e, (Busy, Unreachable)) or e.code in RETRYABLE_CODES


def _progress(ev: dict, sent: int, resumes: int) -> IngestProgress:
    return IngestProgress(**{**ev, "bytes_sent": max(sent, ev.get("bytes_committed", 0)), "resumes": resumes})


def _ingest_event(ev: dict, sent: int, resumes: int, start: int, state: dict, src: Source,
                  on_progress: Callable[[IngestProgress], None] | None) -> IngestProgress:
    """One event of an ingest stream, for both clients: checked, recorded, confirmed to the replay
    source (which may then drop what the server has), reported."""
    if "error" in ev:
        raise error_from_body(0, ev)
    p = _progress(ev, sent, resumes)
    state.update(tokens=p.tokens, tokens_per_s=p.tokens_per_s)
    src.confirm(p.bytes_committed - start)
    if on_progress:
        on_progress(p)
    return p


def _completion_body(prompt: str, session: str | Session | None, sampling: dict[str, Any]) -> dict[str, Any]:
    body = {**sampling, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
    if session is not None:
        body["session_id"] = _sid(session)
    return body


def _completion_event(ev: dict, done: GenerateDone | None) -> tuple[Token | None, GenerateDone | None]:
    """One /v1/completions chunk -> a token to yield and/or the (updated) end of the stream."""
    if ev.get("usage"):
        usage = Usage(**ev["usage"])
        done = done.model_copy(update={"usage": usage}) if done else GenerateDone(finish_reason="length",
                                                                                 usage=usage)
    token = None
    for choice in ev.get("choices") or []:
        if choice.get("text"):
            token = Token(text=choice["text"])
        if choice.get("finish_reason"):
            done = GenerateDone(finish_reason=choice["finish_reason"], usage=done.usage if done else None)
    return token, done


class TokenStream:
    """Tokens as they are generated; ``done`` says how it ended once the iterator is exhausted.
    Closing it early (or leaving a ``with`` block) closes the connection, which cancels the work."""

    def __init__(self, factory: Callable[[TokenStream], Iterator[Token]]):
        self.done: GenerateDone | None = None
        self._it = factory(self)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        return next(self._it)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]

    def text(self) -> str:
        """The whole answer as one string."""
        return "".join(t.text for t in self)


class AsyncTokenStream:
    """The async twin of ``TokenStream``: ``async for tok in stream``."""

    def __init__(self, factory: Callable[[AsyncTokenStream], AsyncIterator[Token]]):
        self.done: GenerateDone | None = None
        self._it = factory(self)

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> Token:
        return await self._it.__anext__()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._it.aclose()  # type: ignore[attr-defined]

    async def text(self) -> str:
        return "".join([t.text async for t in self])


class AtlasClient:
    """Synchronous client. ``url`` / ``api_key`` default to ATLAS_URL / ATLAS_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0,
                 retries: int = 5, backoff: float = 0.25, transport: httpx.BaseTransport | None = None):
        self.url, headers = _settings(url, api_key)
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def __enter__(self) -> AtlasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request, retried on 429/503 and on connections that never opened; errors raised."""
        attempt = 0
        while True:
            try:
                r = self._http.send(self._http.build_request(method, path, **kw), stream=stream)
            except httpx.TransportError as e:
                err: AtlasError = Unreachable(0, "unreachable", f"{self.url}: {e or type(e).__name__}")
                if not isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) and method != "GET":
                    raise err from e  # it may have run: only the caller knows whether to repeat it
            else:
                if r.is_success:
                    return r
                r.read()
                r.close()
                err = error_from_response(r)
            attempt += 1
            if not _retryable(err) or attempt > self.retries:
                raise err
            time.sleep(backoff_s(attempt, err.retry_after, self.backoff))

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._send(method, path, **kw)
        return r.json() if r.content else None

    # -- sessions ------------------------------------------------------------------------------------

    def create_session(self, ttl_s: int | None = None) -> Session:
        return Session(**self._json("POST", "/v1/sessions", json={"ttl_s": ttl_s} if ttl_s else None))

    def list_sessions(self) -> list[Session]:
        return [Session(**s) for s in self._json("GET", "/v1/sessions")["data"]]

    def get_session(self, session: str | Session) -> Session:
        return Session(**self._json("GET", f"/v1/sessions/{_sid(session)}"))

    def delete_session(self, session: str | Session) -> None:
        self._send("DELETE", f"/v1/sessions/{_sid(session)}")

    def fork(self, session: str | Session) -> Session:
        return Session(**self._json("POST", f"/v1/sessions/{_sid(session)}/fork"))

    # -- ingest --------------------------------------------------------------------------------------

    def ingest(self, source: IngestSource, session: str | Session | None = None, *, start: int | None = 0,
               on_progress: ProgressCallback | None = None, piece_bytes: int = 1 << 20,
               request_bytes: int = 8 << 20, max_retries: int | None = None) -> IngestProgress:
        """Stream ``source`` into ``session`` (a new one when None) and return the final progress.

        ``start`` is the document offset where the source begins (0: it is the whole document, and
        bytes the session already has are skipped, so running it again resumes; None: append after
        what the session has). The body goes in requests of ``request_bytes``; after a dropped
        connection or a 429/503 it resumes from the session's ``bytes_committed`` with backoff, up to
        ``max_retries`` failures in a row (default: the client's ``retries`` + 5).
        """
        sid = _sid(session) if session is not None else self.create_session().id
        src = Source(source, piece_bytes)
        have = self.get_session(sid).bytes_committed if session is not None else 0
        start = have if start is None else start
        committed = max(start, have)
        limit = self.retries + 5 if max_retries is None else max_retries
        failures = resumes = 0
        while True:
            try:
                last, finished = self._ingest_once(sid, src, start, committed - start, request_bytes,
                                                   on_progress, resumes)
            except AtlasError as e:
                failures += 1
                if not _retryable(e) or failures > limit:
                    raise
                time.sleep(backoff_s(failures, e.retry_after, self.backoff))
                committed = self.get_session(sid).bytes_committed
                resumes += 1
                continue
            failures = 0
            committed = last.bytes_committed
            src.confirm(committed - start)
            if finished:
                return last

    def _ingest_once(self, sid: str, src: Source, start: int, pos: int, request_bytes: int,
                     on_progress: ProgressCallback | None, resumes: int) -> tuple[IngestProgress, bool]:
        sent, exhausted = 0, False
        state = {"tokens": 0, "tokens_per_s": 0.0}

        def body() -> Iterator[bytes]:
            nonlocal sent, exhausted
            for piece in src.pieces(pos):
                piece = piece[:request_bytes - sent]
                yield piece
                sent += len(piece)
                if on_progress:
                    on_progress(IngestProgress(session_id=sid, bytes_committed=start + pos, bytes_sent=start
                                               + pos + sent, resumes=resumes, **state))
                if sent >= request_bytes:
                    return
            exhausted = True

        final: IngestProgress | None = None
        try:
            with self._http.stream("POST", f"/v1/sessions/{sid}/ingest", params={"offset": start + pos},
                                   content=body(), headers={"Content-Type": "text/plain"}) as r:
                if not r.is_success:
                    r.read()
                    raise error_from_response(r)
                for ev in sse_data(r.iter_lines()):
                    p = _ingest_event(ev, start + pos + sent, resumes, start, state, src, on_progress)
                    if p.done:
                        final = p
        except httpx.TransportError as e:
            raise Unreachable(0, "connection_lost", f"{self.url}: {e or type(e).__name__}") from e
        if final is None:
            raise Unreachable(0, "connection_lost", "the ingest stream ended without its last event")
        return final, exhausted

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, session: str | Session, prompt: str = "", *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, commit: bool = False) -> TokenStream:
        """Continue the session after ``prompt``, token by token (on a fork unless ``commit``)."""
        body = {**sampling_body(prompt, max_tokens, temperature, top_p, top_k, seed, stop), "commit": commit}
        path = f"/v1/sessions/{_sid(session)}/generate"

        def tokens(stream: TokenStream) -> Iterator[Token]:
            r = self._send("POST", path, json=body, stream=True)
            try:
                for ev in sse_data(r.iter_lines()):
                    if "error" in ev:
                        raise error_from_body(0, ev)
                    if ev.get("done"):
                        stream.done = GenerateDone(**ev)
                    else:
                        yield Token(**ev)
            except httpx.TransportError as e:
                raise Unreachable(0, "connection_lost", str(e)) from e
            finally:
                r.close()

        return TokenStream(tokens)

    def complete(self, prompt: str, session: str | Session | None = None, *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None) -> TokenStream:
        """OpenAI-style completion (``/v1/completions``), on a fork of ``session`` when given."""
        body = _completion_body(prompt, session, sampling_body(prompt, max_tokens, temperature, top_p, top_k,
                                                               seed, stop))

        def tokens(stream: TokenStream) -> Iterator[Token]:
            r = self._send("POST", "/v1/completions", json=body, stream=True)
            try:
                for ev in sse_data(r.iter_lines()):
                    if "error" in ev:
                        raise error_from_body(0, ev)
                    token, stream.done = _completion_event(ev, stream.done)
                    if token is not None:
                        yield token
            except httpx.TransportError as e:
                raise Unreachable(0, "connection_lost", str(e)) from e
            finally:
                r.close()

        return TokenStream(tokens)


class AsyncAtlasClient:
    """Asynchronous client (same methods, ``await``-ed; ``generate``/``complete`` are async iterators)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0,
                 retries: int = 5, backoff: float = 0.25, transport: httpx.AsyncBaseTransport | None = None):
        self.url, headers = _settings(url, api_key)
        self.retries, self.backoff = retries, backoff
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=10.0))

    async def __aenter__(self) -> AsyncAtlasClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = await self._http.send(self._http.build_request(method, path, **kw), stream=stream)
            except httpx.TransportError as e:
                err: AtlasError = Unreachable(0, "unreachable", f"{self.url}: {e or type(e).__name__}")
                if not isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) and method != "GET":
                    raise err from e
            else:
                if r.is_success:
                    return r
                await r.aread()
                await r.aclose()
                err = error_from_response(r)
            attempt += 1
            if not _retryable(err) or attempt > self.retries:
                raise err
            await asyncio.sleep(backoff_s(attempt, err.retry_after, self.backoff))

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self._send(method, path, **kw)
        return r.json() if r.content else None

    async def create_session(self, ttl_s: int | None = None) -> Session:
        return Session(**await self._json("POST", "/v1/sessions", json={"ttl_s": ttl_s} if ttl_s else None))

    async def list_sessions(self) -> list[Session]:
        return [Session(**s) for s in (await self._json("GET", "/v1/sessions"))["data"]]

    async def get_session(self, session: str | Session) -> Session:
        return Session(**await self._json("GET", f"/v1/sessions/{_sid(session)}"))

    async def delete_session(self, session: str | Session) -> None:
        await self._send("DELETE", f"/v1/sessions/{_sid(session)}")

    async def fork(self, session: str | Session) -> Session:
        return Session(**await self._json("POST", f"/v1/sessions/{_sid(session)}/fork"))

    async def ingest(self, source: IngestSource, session: str | Session | None = None, *,
                     start: int | None = 0, on_progress: ProgressCallback | None = None,
                     piece_bytes: int = 1 << 20, request_bytes: int = 8 << 20,
                     max_retries: int | None = None) -> IngestProgress:
        """As ``AtlasClient.ingest`` (files are read in small pieces on the event loop's thread)."""
        sid = _sid(session) if session is not None else (await self.create_session()).id
        src = Source(source, piece_bytes)
        have = (await self.get_session(sid)).bytes_committed if session is not None else 0
        start = have if start is None else start
        committed = max(start, have)
        limit = self.retries + 5 if max_retries is None else max_retries
        failures = resumes = 0
        while True:
            try:
                last, finished = await self._ingest_once(sid, src, start, committed - start, request_bytes,
                                                         on_progress, resumes)
            except AtlasError as e:
                failures += 1
                if not _retryable(e) or failures > limit:
                    raise
                await asyncio.sleep(backoff_s(failures, e.retry_after, self.backoff))
                committed = (await self.get_session(sid)).bytes_committed
                resumes += 1
                continue
            failures = 0
            committed = last.bytes_committed
            src.confirm(committed - start)
            if finished:
                return last

    async def _ingest_once(self, sid: str, src: Source, start: int, pos: int, request_bytes: int,
                           on_progress: ProgressCallback | None, resumes: int) -> tuple[IngestProgress, bool]:
        sent, exhausted = 0, False
        state = {"tokens": 0, "tokens_per_s": 0.0}

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent, exhausted
            for piece in src.pieces(pos):
                piece = piece[:request_bytes - sent]
                yield piece
                sent += len(piece)
                if on_progress:
                    on_progress(IngestProgress(session_id=sid, bytes_committed=start + pos, bytes_sent=start
                                               + pos + sent, resumes=resumes, **state))
                if sent >= request_bytes:
                    return
            exhausted = True

        final: IngestProgress | None = None
        try:
            async with self._http.stream("POST", f"/v1/sessions/{sid}/ingest",
                                         params={"offset": start + pos}, content=body(),
                                         headers={"Content-Type": "text/plain"}) as r:
                if not r.is_success:
                    await r.aread()
                    raise error_from_response(r)
                async for line in r.aiter_lines():
                    for ev in sse_data([line]):
                        p = _ingest_event(ev, start + pos + sent, resumes, start, state, src, on_progress)
                        if p.done:
                            final = p
        except httpx.TransportError as e:
            raise Unreachable(0, "connection_lost", f"{self.url}: {e or type(e).__name__}") from e
        if final is None:
            raise Unreachable(0, "connection_lost", "the ingest stream ended without its last event")
        return final, exhausted

    def generate(self, session: str | Session, prompt: str = "", *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, commit: bool = False) -> AsyncTokenStream:
        body = {**sampling_body(prompt, max_tokens, temperature, top_p, top_k, seed, stop), "commit": commit}
        path = f"/v1/sessions/{_sid(session)}/generate"

        async def tokens(stream: AsyncTokenStream) -> AsyncIterator[Token]:
            r = await self._send("POST", path, json=body, stream=True)
            try:
                async for line in r.aiter_lines():
                    for ev in sse_data([line]):
                        if "error" in ev:
                            raise error_from_body(0, ev)
                        if ev.get("done"):
                            stream.done = GenerateDone(**ev)
                        else:
                            yield Token(**ev)
            except httpx.TransportError as e:
                raise Unreachable(0, "connection_lost", str(e)) from e
            finally:
                await r.aclose()

        return AsyncTokenStream(tokens)

    def complete(self, prompt: str, session: str | Session | None = None, *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None) -> AsyncTokenStream:
        body = _completion_body(prompt, session, sampling_body(prompt, max_tokens, temperature, top_p, top_k,
                                                               seed, stop))

        async def tokens(stream: AsyncTokenStream) -> AsyncIterator[Token]:
            r = await self._send("POST", "/v1/completions", json=body, stream=True)
            try:
                async for line in r.aiter_lines():
                    for ev in sse_data([line]):
                        if "error" in ev:
                            raise error_from_body(0, ev)
                        token, stream.done = _completion_event(ev, stream.done)
                        if token is not None:
                            yield token
            except httpx.TransportError as e:
                raise Unreachable(0, "connection_lost", str(e)) from e
            finally:
                await r.aclose()

        return AsyncTokenStream(tokens)
