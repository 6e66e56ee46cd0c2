"""``AtlasClient`` (sync) and ``AsyncAtlasClient``: the server's HTTP API as typed Python calls.

Both retry what is safe to retry by themselves: a 429 / 503 answer (the server did nothing) and a
connection that could not be opened, with exponential backoff that honours ``Retry-After``. An
ingest also survives a connection dropped mid-document: it asks the session for its
``bytes_committed`` and sends the rest from there (the server skips bytes it already has), so the
result is the session an uninterrupted upload would have made.

Both are faces of one implementation, ``_core.Calls``: the async client awaits it over
``httpx.AsyncClient``; the sync client runs it over ``httpx.Client`` in the caller's thread.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

import httpx

from ._core import AsyncIO, AsyncTokenStream, BlockingIO, Calls, Messages, StateTarget, result
from .models import ChatCompletion, GenerateDone, Session, Token

P = ParamSpec("P")
A = TypeVar("A")
T = TypeVar("T")
C = TypeVar("C", bound="Closing")


class Closing:
    """Closed at the end of a ``with`` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAtlasClient(Calls):
    """Asynchronous client: ``AtlasClient``'s methods, awaited; ``generate`` / ``complete`` return
    async iterators. ``url`` / ``api_key`` default to ATLAS_URL / ATLAS_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0,
                 retries: int = 5, backoff: float = 0.25, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(AsyncIO, url, api_key, timeout=timeout, retries=retries, backoff=backoff,
                         transport=transport)


class TokenStream(Closing):
    """Tokens as they are generated; ``done`` says how it ended once the iterator is exhausted.
    Closing it early (or leaving a ``with`` block) closes the connection, which cancels the work."""

    def __init__(self, tokens: AsyncTokenStream):
        self._tokens = tokens

    @property
    def done(self) -> GenerateDone | None:
        return self._tokens.done

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        try:
            return result(self._tokens.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        result(self._tokens.aclose())

    def text(self) -> str:
        """The whole answer as one string."""
        return "".join(t.text for t in self)


def _iterate(items: AsyncGenerator[T, None]) -> Iterator[T]:
    """An async generator over ``BlockingIO`` read as a plain iterator, one item per step; closing
    (or dropping) the iterator closes the generator."""
    try:
        while True:
            try:
                yield result(items.__anext__())
            except StopAsyncIteration:
                return
    finally:
        result(items.aclose())


def _blocking(call: Callable[Concatenate[Calls, P], A], finish: Callable[[A], T],
              returns: str | None = None) -> Callable[Concatenate[AtlasClient, P], T]:
    """``call`` as a method of ``AtlasClient`` (same signature and docstring): made on its ``Calls``
    and ``finish``-ed there, in the caller's thread. ``returns``: what help() shows it returns."""

    @functools.wraps(call)
    def method(self: AtlasClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return finish(call(self._calls, *args, **kwargs))

    if isinstance(finish, type):  # help() shows what the sync face returns: TokenStream
        returns = finish.__name__
    if returns is not None:
        signature = inspect.signature(call).replace(return_annotation=returns)
        method.__signature__ = signature  # type: ignore[attr-defined]
    return method


def _setting(name: str) -> Any:
    """An attribute of ``AtlasClient`` that lives on its ``Calls``."""
    return property(lambda self: getattr(self._calls, name), lambda self, v: setattr(self._calls, name, v))


class AtlasClient(Closing):
    """Synchronous client. ``url`` / ``api_key`` default to ATLAS_URL / ATLAS_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0,
                 retries: int = 5, backoff: float = 0.25, transport: httpx.BaseTransport | None = None):
        self._calls = Calls(BlockingIO, url, api_key, timeout=timeout, retries=retries, backoff=backoff,
                            transport=transport)

    url, retries, backoff = _setting("url"), _setting("retries"), _setting("backoff")

    create_session = _blocking(Calls.create_session, result)
    list_sessions = _blocking(Calls.list_sessions, result)
    list_sessions_page = _blocking(Calls.list_sessions_page, result)
    iter_sessions = _blocking(Calls.iter_sessions, _iterate, "Iterator[Session]")
    get_session = _blocking(Calls.get_session, result)
    update_session = _blocking(Calls.update_session, result)
    delete_session = _blocking(Calls.delete_session, result)
    fork = _blocking(Calls.fork, result)
    import_state = _blocking(Calls.import_state, result)
    ingest = _blocking(Calls.ingest, result)
    generate = _blocking(Calls.generate, TokenStream)
    complete = _blocking(Calls.complete, TokenStream)

    @overload
    def export_state(self, session: str | Session, target: None = None) -> bytes: ...

    @overload
    def export_state(self, session: str | Session, target: StateTarget) -> int: ...

    def export_state(self, session: str | Session, target: StateTarget | None = None) -> bytes | int:
        """The session as one session file: streamed to ``target`` (a path, written aside and renamed
        when whole, or a binary file; returns the bytes written), or returned as bytes (see
        ``AsyncAtlasClient.export_state``)."""
        if target is None:  # (one overload of the core's per branch)
            return result(self._calls.export_state(session))
        return result(self._calls.export_state(session, target))

    @overload
    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: Literal[True] = True, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> TokenStream: ...

    @overload
    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: Literal[False], max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> ChatCompletion: ...

    def chat(self, messages: Messages, *, session_id: str | Session | None = None, commit: bool = False,
             stream: bool = True, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | list[str] | None = None) -> TokenStream | ChatCompletion:
        """OpenAI's chat completions: a ``TokenStream``, or with ``stream=False`` one
        ``ChatCompletion`` (``.text``). ``session_id``: read after that session's document, on a fork;
        ``commit``: append the messages and the answer to the session (see ``AsyncAtlasClient.chat``)."""
        options: dict[str, Any] = dict(session_id=session_id, commit=commit, max_tokens=max_tokens,
                                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                       stop=stop)
        if stream:
            return TokenStream(self._calls.chat(messages, stream=True, **options))
        return result(self._calls.chat(messages, stream=False, **options))

    def close(self) -> None:
        result(self._calls.aclose())
