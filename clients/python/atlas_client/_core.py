"""The client's calls, written once for ``AtlasClient`` and ``AsyncAtlasClient``.

``Calls`` holds what to send, when to retry and how to read the answers, as coroutines over an I/O
object. ``AsyncIO`` awaits an ``httpx.AsyncClient``. ``BlockingIO`` calls an ``httpx.Client`` and
never suspends, so the sync client runs the very same coroutines to their end in the caller's
thread (``result``), with no event loop. The decisions that need no I/O at all (backoff, where an
ingest resumes, what an event means) are plain classes and functions.
"""

from __future__ import annotations

import asyncio
import enum
import io
import json
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, Union, overload

import httpx

from ._source import IngestSource, Source, _seekable
from .errors import (
    FINAL_CODES,
    RETRYABLE_CODES,
    AtlasError,
    Busy,
    Unreachable,
    error_from_body,
    error_from_response,
)
from .models import (
    ChatCompletion,
    GenerateDone,
    IngestProgress,
    MetadataValue,
    Session,
    SessionPage,
    Token,
    Usage,
)

DEFAULT_URL = "http://127.0.0.1:8000"

T = TypeVar("T")
AC = TypeVar("AC", bound="AsyncClosing")
ProgressCallback = Callable[[IngestProgress], None]
#: Chat messages as OpenAI's API takes them: ``{"role": "user", "content": "..."}``.
Messages = Sequence[Mapping[str, Any]]
Events = AsyncGenerator[dict[str, Any], None]
#: Reads one event of a token stream: the token to yield (or None) and how the stream has ended so far.
EventReader = Callable[[dict[str, Any], GenerateDone | None], tuple[Token | None, GenerateDone | None]]
#: A session's metadata as the calls take it: a flat mapping of strings, numbers, booleans, None.
Labels = Mapping[str, MetadataValue]


class BinaryWriter(Protocol):
    """Anything with ``write(bytes)``: a file open in binary mode, ``sys.stdout.buffer``, a socket's
    file, io.BytesIO. One that can also seek is rewound when a download starts over."""

    def write(self, data: bytes, /) -> Any: ...


#: Where ``export_state`` puts a session file: a path (written aside, then renamed into place) or a
#: binary file open for writing.
StateTarget = Union[str, "os.PathLike[str]", BinaryWriter]  # noqa: UP007 - a runtime alias: Python 3.10


class _Keep(enum.Enum):
    KEEP = "keep"

    def __repr__(self) -> str:  # as help() shows the default
        return "KEEP"


#: ``update_session``'s default: leave the field as it is (None means remove it, so None cannot).
KEEP: Final = _Keep.KEEP


def result(step: Awaitable[T]) -> T:
    """The value of a coroutine over ``BlockingIO``: it never suspends, so one ``send`` runs it to
    its end in this thread."""
    steps = step.__await__()
    try:
        steps.send(None)
    except StopIteration as end:
        return end.value
    steps.close()
    raise RuntimeError("a call over BlockingIO suspended: it awaited something that is not BlockingIO")


class BlockingIO:
    """``httpx.Client`` behind coroutines that never suspend."""

    def __init__(self, **options: Any):
        self.http = httpx.Client(**options)

    async def send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return self.http.send(request, stream=stream)

    async def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        for line in response.iter_lines():
            yield line

    async def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        for piece in response.iter_bytes():
            yield piece

    def body(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        return pieces

    async def read(self, response: httpx.Response) -> None:
        response.read()

    async def close(self, response: httpx.Response) -> None:
        response.close()

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def aclose(self) -> None:
        self.http.close()


class AsyncIO:
    """``httpx.AsyncClient``, awaited."""

    def __init__(self, **options: Any):
        self.http = httpx.AsyncClient(**options)

    async def send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return await self.http.send(request, stream=stream)

    def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        return response.aiter_lines()

    def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        return response.aiter_bytes()

    async def body(self, pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
        # httpx.AsyncClient sends only an async body; the pieces are read on the event loop's thread
        for piece in pieces:
            yield piece

    async def read(self, response: httpx.Response) -> None:
        await response.aread()

    async def close(self, response: httpx.Response) -> None:
        await response.aclose()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        await self.http.aclose()


class Retry:
    """Failures in a row, and how long to wait after each: exponential backoff with jitter, where a
    server's Retry-After is a floor, never ignored."""

    def __init__(self, limit: int, base_s: float, cap_s: float = 8.0):
        self.limit, self.base_s, self.cap_s = limit, base_s, cap_s
        self.failures = 0

    def wait_s(self, error: AtlasError) -> float:
        """Seconds to wait before trying again after ``error``; raises it when it is not worth
        retrying (the server refused for good, or too many failures in a row)."""
        self.failures += 1
        retryable = (isinstance(error, (Busy, Unreachable)) and error.code not in FINAL_CODES
                     or error.code in RETRYABLE_CODES)
        if not retryable or self.failures > self.limit:
            raise error
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1)) * (0.5 + random.random() / 2)
        return max(delay, error.retry_after or 0.0)


class Upload:
    """Where an ingest stands: the document offset its current request starts at, what that request
    has sent, and the progress reports both make. Each request's body starts where the server's
    ``bytes_committed`` says, so a resumed upload makes the same session as an uninterrupted one."""

    def __init__(self, sid: str, source: Source, start: int, offset: int, request_bytes: int,
                 on_progress: ProgressCallback | None):
        self.sid, self.source, self.start, self.offset = sid, source, start, offset
        self.request_bytes, self.on_progress = request_bytes, on_progress
        self.sent = self.resumes = self.tokens = 0
        self.tokens_per_s = 0.0
        self.exhausted = False  # the last request's body reached the end of the source

    def body(self) -> Iterator[bytes]:
        """The next request's bytes: the source from ``offset``, at most ``request_bytes``."""
        self.sent, self.exhausted = 0, False
        for piece in self.source.pieces(self.offset - self.start):
            piece = piece[:self.request_bytes - self.sent]
            yield piece
            self.sent += len(piece)
            self._report({"bytes_committed": self.offset, "tokens": self.tokens,
                          "tokens_per_s": self.tokens_per_s})
            if self.sent >= self.request_bytes:
                return
        self.exhausted = True

    def event(self, event: dict[str, Any]) -> IngestProgress:
        """A progress event of the current request, reported. Not a confirmation: its
        ``bytes_committed`` is committed only when the request ends (a store outage before then
        sends the next request back to the last checkpoint), so the source keeps it for a replay."""
        progress = self._report(event)
        self.tokens, self.tokens_per_s = progress.tokens, progress.tokens_per_s
        return progress

    def finished(self, last: IngestProgress) -> bool:
        """A request ended with ``last``: the next starts there. True when the source is all in."""
        self.offset = last.bytes_committed
        self.source.confirm(self.offset - self.start)
        return self.exhausted

    def resume(self, committed: int) -> None:
        """A request failed: the next starts at what the server has committed."""
        self.offset = committed
        self.resumes += 1

    def _report(self, fields: dict[str, Any]) -> IngestProgress:
        sent = max(self.offset + self.sent, fields.get("bytes_committed", 0))
        progress = IngestProgress(**{"session_id": self.sid, **fields, "bytes_sent": sent,
                                     "resumes": self.resumes})
        if self.on_progress:
            self.on_progress(progress)
        return progress


def sid_of(session: str | Session) -> str:
    return session.id if isinstance(session, Session) else session


def metadata_filter(metadata: Labels) -> list[str]:
    """``?metadata=K=V`` values: the server compares text, a string as it is and any other value as
    JSON (``3``, ``true``, ``null``), so a filter matches the value it was set to (and 3 matches
    "3" too: the query string has no types)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in metadata.items()]


def sampling_body(prompt: str, max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                  seed: int | None, stop: str | list[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    for k, v in (("max_tokens", max_tokens), ("seed", seed), ("stop", stop)):
        if v is not None:
            body[k] = v
    return body


def generate_event(event: dict[str, Any],
                   done: GenerateDone | None) -> tuple[Token | None, GenerateDone | None]:
    """One event of /generate: a token, or the last one, which says how it ended."""
    if event.get("done"):
        return None, GenerateDone(**event)
    return Token(**event), done


def _openai_event(event: dict[str, Any], done: GenerateDone | None,
                  text_of: Callable[[dict[str, Any]], str | None]
                  ) -> tuple[Token | None, GenerateDone | None]:
    """One chunk of an OpenAI stream: a token (the text `text_of` finds in a choice) and/or how the
    stream ended (``finish_reason``, then ``usage`` in a last chunk without choices)."""
    if event.get("usage"):
        usage = Usage(**event["usage"])
        done = done.model_copy(update={"usage": usage}) if done else GenerateDone(finish_reason="length",
                                                                                 usage=usage)
    token = None
    for choice in event.get("choices") or []:
        if text := text_of(choice):
            token = Token(text=text)
        if choice.get("finish_reason"):
            done = GenerateDone(finish_reason=choice["finish_reason"], usage=done.usage if done else None)
    return token, done


def completion_event(event: dict[str, Any],
                     done: GenerateDone | None) -> tuple[Token | None, GenerateDone | None]:
    """One /v1/completions chunk: ``choices[0].text``."""
    return _openai_event(event, done, lambda choice: choice.get("text"))


def chat_event(event: dict[str, Any],
               done: GenerateDone | None) -> tuple[Token | None, GenerateDone | None]:
    """One ``chat.completion.chunk``: ``choices[0].delta.content``."""
    return _openai_event(event, done, lambda choice: (choice.get("delta") or {}).get("content"))


class AsyncClosing:
    """Closed at the end of an ``async with`` block."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: AC) -> AC:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncTokenStream(AsyncClosing):
    """Tokens as they are generated (``async for``); ``done`` says how it ended once they are all
    read. Closing it early (or leaving an ``async with`` block) closes the connection, which cancels
    the work. The request leaves at the first read."""

    def __init__(self, events: Events, read: EventReader):
        self.done: GenerateDone | None = None
        self._tokens = self._read(events, read)

    async def _read(self, events: Events, read: EventReader) -> AsyncGenerator[Token, None]:
        async with aclosing(events):
            async for event in events:
                token, self.done = read(event, self.done)
                if token is not None:
                    yield token

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> Token:
        return await self._tokens.__anext__()

    async def aclose(self) -> None:
        await self._tokens.aclose()

    async def text(self) -> str:
        """The whole answer as one string."""
        return "".join([t.text async for t in self])


class Calls(AsyncClosing):
    """The server's HTTP API as typed calls, over ``io``. ``url`` / ``api_key`` default to
    ATLAS_URL / ATLAS_API_KEY."""

    def __init__(self, io: type[BlockingIO] | type[AsyncIO], url: str | None, api_key: str | None, *,
                 timeout: float, retries: int, backoff: float, transport: Any):
        self.url = (url or os.environ.get("ATLAS_URL") or DEFAULT_URL).rstrip("/")
        self.retries, self.backoff = retries, backoff
        key = api_key if api_key is not None else os.environ.get("ATLAS_API_KEY")
        self._io = io(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {},
                      transport=transport, timeout=httpx.Timeout(timeout, connect=10.0))

    async def aclose(self) -> None:
        await self._io.aclose()

    # -- requests ------------------------------------------------------------------------------------

    def _unreachable(self, e: httpx.TransportError, code: str) -> Unreachable:
        return Unreachable(0, code, f"{self.url}: {str(e) or type(e).__name__}")

    async def _attempt(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request; a failed connection or an error answer raised as an AtlasError."""
        try:
            response = await self._io.send(self._io.http.build_request(method, path, **kw), stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise self._unreachable(e, "unreachable") from e
        except httpx.TransportError as e:
            raise self._unreachable(e, "connection_lost") from e
        if not response.is_success:
            await self._io.read(response)
            raise error_from_response(response)
        return response

    async def _send(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request, retried on 429/503 and on connections that never opened (any drop, for a GET)."""
        retry = Retry(self.retries, self.backoff)
        while True:
            try:
                return await self._attempt(method, path, stream=stream, **kw)
            except AtlasError as e:
                if e.code == "connection_lost" and method != "GET":
                    raise  # it may have run: only the caller knows whether to repeat it
                await self._io.sleep(retry.wait_s(e))

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = await self._send(method, path, **kw)
        return response.json() if response.content else None

    async def _events(self, send: Callable[[], Awaitable[httpx.Response]]) -> Events:
        """The ``data:`` events of the event stream that ``send`` answers, up to ``[DONE]`` or its
        end. An error event is raised; a dropped connection is Unreachable ``connection_lost``."""
        response = await send()
        try:
            async for line in self._io.lines(response):
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise error_from_body(0, event)
                yield event
        except httpx.TransportError as e:
            raise self._unreachable(e, "connection_lost") from e
        finally:
            await self._io.close(response)

    # -- sessions ------------------------------------------------------------------------------------

    async def create_session(self, ttl_s: int | None = None) -> Session:
        body = {"ttl_s": ttl_s} if ttl_s is not None else None  # 0 goes too: the server refuses it
        return Session(**await self._json("POST", "/v1/sessions", json=body))

    async def list_sessions_page(self, *, name: str | None = None,
                                 metadata: Labels | None = None,
                                 limit: int | None = None, cursor: str | None = None) -> SessionPage:
        """One page of your sessions, oldest first: ``limit`` of them (the server's default 100, at
        most 1000) after ``cursor`` (the previous page's ``next_cursor``), only those named ``name``
        and whose metadata holds every item of ``metadata``."""
        params: list[tuple[str, str | int]] = [("metadata", m) for m in metadata_filter(metadata or {})]
        for key, value in (("name", name), ("limit", limit), ("cursor", cursor)):
            if value is not None:
                params.append((key, value))
        return SessionPage(**await self._json("GET", "/v1/sessions", params=params))

    async def iter_sessions(self, *, name: str | None = None, metadata: Labels | None = None,
                            limit: int | None = None) -> AsyncGenerator[Session, None]:
        """Your sessions (filtered as ``list_sessions_page``), page after page of ``limit`` as they are
        read: the next page is asked for only when this one is used up."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions_page(name=name, metadata=metadata, limit=limit, cursor=cursor)
            for s in page.data:
                yield s
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    async def list_sessions(self, *, name: str | None = None, metadata: Labels | None = None,
                            limit: int | None = None) -> list[Session]:
        """All your sessions, oldest first (every page, ``limit`` per request), only those named
        ``name`` and whose metadata holds every item of ``metadata`` (``{"project": "x"}``).
        A session listed with ``broken`` set serves nothing and can be deleted."""
        return [s async for s in self.iter_sessions(name=name, metadata=metadata, limit=limit)]

    async def update_session(self, session: str | Session, *, name: str | None | _Keep = KEEP,
                             metadata: Labels | None | _Keep = KEEP,
                             ttl_s: int | None | _Keep = KEEP, sliding_ttl: bool | _Keep = KEEP) -> Session:
        """Change a session's labels and expiry; what is not given stays. ``name=None`` removes the
        name, ``metadata`` replaces the old one whole (None or ``{}`` clears it), ``ttl_s`` restarts the
        TTL from now (None: the session never expires), ``sliding_ttl=True`` restarts it on every
        request that uses the session. The state is never touched."""
        fields: dict[str, Any] = {"name": name, "ttl_s": ttl_s, "sliding_ttl": sliding_ttl,
                                  "metadata": dict(metadata) if isinstance(metadata, Mapping) else metadata}
        body = {k: v for k, v in fields.items() if v is not KEEP}
        return Session(**await self._json("PATCH", f"/v1/sessions/{sid_of(session)}", json=body))

    async def get_session(self, session: str | Session) -> Session:
        return Session(**await self._json("GET", f"/v1/sessions/{sid_of(session)}"))

    async def delete_session(self, session: str | Session) -> None:
        await self._send("DELETE", f"/v1/sessions/{sid_of(session)}")

    async def fork(self, session: str | Session) -> Session:
        return Session(**await self._json("POST", f"/v1/sessions/{sid_of(session)}/fork"))

    # -- session files -------------------------------------------------------------------------------

    @overload
    async def export_state(self, session: str | Session, target: None = None) -> bytes: ...

    @overload
    async def export_state(self, session: str | Session, target: StateTarget) -> int: ...

    async def export_state(self, session: str | Session, target: StateTarget | None = None) -> bytes | int:
        """The session's committed state as one session file (``import_state`` makes a session of it,
        here or on another server running the same model). Streamed to ``target``, a path or a binary
        file, and the number of bytes written returned; without one, returned as bytes. A path is
        written beside itself first (``<path>.part``) and renamed when whole: never half a file."""
        path = f"/v1/sessions/{sid_of(session)}/state"
        if target is None:
            buffer = io.BytesIO()
            await self._download(path, buffer)
            return buffer.getvalue()
        if not isinstance(target, (str, os.PathLike)):
            return await self._download(path, target)
        dest = Path(target)
        part = dest.with_name(dest.name + ".part")
        try:
            with open(part, "wb") as f:
                written = await self._download(path, f)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return written

    async def _download(self, path: str, sink: BinaryWriter) -> int:
        """GET ``path`` into ``sink``, piece by piece; returns the bytes written. A connection dropped
        mid-body starts it over (a GET changes nothing) when ``sink`` can be rewound."""
        rewind: Any = sink if _seekable(sink) else None
        start = rewind.tell() if rewind is not None else 0
        retry = Retry(self.retries, self.backoff)
        while True:
            response = await self._send("GET", path, stream=True)
            written = 0
            try:
                async for piece in self._io.chunks(response):
                    sink.write(piece)
                    written += len(piece)
                return written
            except httpx.TransportError as e:
                lost = self._unreachable(e, "connection_lost")
                if rewind is None:
                    raise lost from e
            finally:
                await self._io.close(response)
            await self._io.sleep(retry.wait_s(lost))
            rewind.seek(start)
            rewind.truncate()

    async def import_state(self, source: IngestSource, ttl_s: int | None = None) -> Session:
        """A new session from a session file (``export_state``'s): a path, bytes or a binary file,
        streamed up. It is the exported session again (state bit for bit, counters, name, metadata)
        under a new id, expiring after ``ttl_s`` (default: never). A damaged file or another format
        raises AtlasError ``invalid_session_file`` (400), another model's Conflict ``foreign_model``."""
        src = Source(source)
        size = src.size()
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:  # lets the server refuse an oversized file before it is sent
            headers["Content-Length"] = str(size)
        params = {"ttl_s": ttl_s} if ttl_s is not None else {}
        retry = Retry(self.retries, self.backoff)
        while True:  # each try sends the source again from its start (a stream is replayed from memory)
            try:
                response = await self._attempt("POST", "/v1/sessions/import", params=params, headers=headers,
                                               content=self._io.body(src.pieces(0)))
                return Session(**response.json())
            except AtlasError as e:
                if e.code == "connection_lost":
                    raise  # the session may have been made: only the caller knows whether to repeat
                await self._io.sleep(retry.wait_s(e))

    # -- ingest --------------------------------------------------------------------------------------

    async def ingest(self, source: IngestSource, session: str | Session | None = None, *,
                     start: int | None = 0, on_progress: ProgressCallback | None = None,
                     piece_bytes: int = 1 << 20, request_bytes: int = 8 << 20,
                     max_retries: int | None = None) -> IngestProgress:
        """Stream ``source`` into ``session`` (a new one when None) and return the final progress.

        ``start`` is the document offset where the source begins (0: it is the whole document, and
        bytes the session already has are skipped, so running it again resumes; None: append after
        what the session has). The body goes in requests of ``request_bytes``; after a dropped
        connection or a 429/503 it resumes from the session's ``bytes_committed`` with backoff, up to
        ``max_retries`` failures in a row (default: the client's ``retries`` + 5).
        """
        src = Source(source, piece_bytes)
        sid = sid_of(session) if session is not None else (await self.create_session()).id
        have = (await self.get_session(sid)).bytes_committed if session is not None else 0
        start = have if start is None else start
        upload = Upload(sid, src, start, max(start, have), request_bytes, on_progress)
        retry = Retry(self.retries + 5 if max_retries is None else max_retries, self.backoff)
        while True:
            try:
                last = await self._ingest_request(upload)
            except AtlasError as e:
                await self._io.sleep(retry.wait_s(e))
                upload.resume((await self.get_session(sid)).bytes_committed)
                continue
            retry.failures = 0  # the limit is on failures in a row
            if upload.finished(last):
                return last

    async def _ingest_request(self, upload: Upload) -> IngestProgress:
        """One request of an ingest, its body from ``upload.offset``; returns its last event."""
        send = lambda: self._attempt(  # no retry here: the body is spent; ``ingest`` resumes instead
            "POST", f"/v1/sessions/{upload.sid}/ingest", stream=True, params={"offset": upload.offset},
            content=self._io.body(upload.body()), headers={"Content-Type": "text/plain"})
        last: IngestProgress | None = None
        async with aclosing(self._events(send)) as events:
            async for event in events:
                progress = upload.event(event)
                last = progress if progress.done else last
        if last is None:
            raise Unreachable(0, "connection_lost", "the ingest stream ended without its last event")
        return last

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, session: str | Session, prompt: str = "", *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, commit: bool = False) -> AsyncTokenStream:
        """Continue the session after ``prompt``, token by token (on a fork unless ``commit``)."""
        body = {**sampling_body(prompt, max_tokens, temperature, top_p, top_k, seed, stop), "commit": commit}
        path = f"/v1/sessions/{sid_of(session)}/generate"
        return AsyncTokenStream(self._events(lambda: self._send("POST", path, json=body, stream=True)),
                                generate_event)

    def complete(self, prompt: str, session: str | Session | None = None, *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None) -> AsyncTokenStream:
        """OpenAI-style completion (``/v1/completions``), on a fork of ``session`` when given."""
        body = {**sampling_body(prompt, max_tokens, temperature, top_p, top_k, seed, stop), "stream": True,
                "stream_options": {"include_usage": True}}
        if session is not None:
            body["session_id"] = sid_of(session)
        return AsyncTokenStream(self._events(lambda: self._send("POST", "/v1/completions", json=body,
                                                                stream=True)), completion_event)

    @overload
    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: Literal[True] = True, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> AsyncTokenStream: ...

    @overload
    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: Literal[False], max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> Awaitable[ChatCompletion]: ...

    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: bool = True, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> AsyncTokenStream | Awaitable[ChatCompletion]:
        """OpenAI's chat completions (``/v1/chat/completions``): the answer to ``messages``
        (``[{"role": "user", "content": "..."}]``), as a token stream, or with ``stream=False`` one
        ``ChatCompletion`` (``.text``). With ``session_id`` the conversation is read after that
        session's document, on a fork; ``commit`` appends the messages and the answer to the session
        instead (send only the new messages next time: the session holds the earlier ones)."""
        body: dict[str, Any] = {**sampling_body("", max_tokens, temperature, top_p, top_k, seed, stop),
                                "messages": [dict(m) for m in messages], "stream": stream}
        del body["prompt"]
        if session_id is not None:
            body["session_id"] = sid_of(session_id)
        if commit:
            body["commit"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
            return AsyncTokenStream(self._events(lambda: self._send("POST", "/v1/chat/completions", json=body,
                                                                    stream=True)), chat_event)
        return self._chat_completion(body)

    async def _chat_completion(self, body: dict[str, Any]) -> ChatCompletion:
        return ChatCompletion(**await self._json("POST", "/v1/chat/completions", json=body))
