"""Sessions: create, list, get, delete, fork; ingest a document; generate from a session."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from atlas.engine import session_file
from atlas.engine.runtime import IngestProgress
from atlas.engine.store.base import KEEP, Keep

from ..dependencies import MetricsDep, ServicesDep, SessionIdDep, SettingsDep, TenantDep
from ..errors import ApiError, error_event
from ..metrics import Metrics
from ..schemas import (
    MAX_NAME_CHARS,
    MAX_TTL_S,
    GenerateDoneEvent,
    GenerateRequest,
    IngestEvent,
    SessionCreate,
    SessionList,
    SessionOut,
    SessionPatch,
    Usage,
)
from ..streaming import EventStream, Finished, Token, generation, primed, sse
from .common import ERRORS, GEN_ERRORS, JSON_ERRORS, JSON_GEN_ERRORS, prompt_ids, sampling

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SSE_DOC = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
#: An export streams in pieces of this size.
EXPORT_PIECE = 1 << 20


@router.post("", status_code=201, response_model=SessionOut, responses=JSON_ERRORS)
async def create_session(who: TenantDep, services: ServicesDep, settings: SettingsDep,
                         body: SessionCreate | None = Body(None)) -> SessionOut:
    """A new empty session. 429 ``too_many_sessions`` once the tenant holds ATLAS_MAX_SESSIONS_PER_TENANT
    (counted atomically in the store: concurrent creates and forks never pass it)."""
    meta = await services.runtime.create_session(who, ttl_s=body.ttl_s if body else None,
                                                 max_sessions=settings.max_sessions_per_tenant)
    return SessionOut.of(meta)


@router.get("", response_model=SessionList, responses=ERRORS)
async def list_sessions(who: TenantDep, services: ServicesDep,
                        limit: int = Query(100, ge=1, le=1000, description="Sessions per page."),
                        cursor: str | None = Query(None, max_length=300,
                                                   description="next_cursor of the previous page."),
                        name: str | None = Query(None, max_length=MAX_NAME_CHARS,
                                                 description="Only sessions of this name."),
                        metadata: list[str] = Query([], description="Only sessions whose metadata has "
                                                    "KEY=VALUE (repeatable; all must match).")
                        ) -> SessionList:
    """The caller's sessions, oldest first, in pages. A session whose stored metadata fails its
    checks is listed with ``broken`` (why): it serves nothing (409 ``state_corrupt``) and can be
    deleted."""
    wanted = [_metadata_filter(m) for m in metadata]
    after = _decode_cursor(cursor) if cursor else None
    rows = [SessionOut.of(m) for m in await services.runtime.list_sessions(who)]
    rows = [r for r in rows if (name is None or r.name == name)
            and all(k in r.metadata and _label(r.metadata[k]) == v for k, v in wanted)
            and (after is None or (r.created, r.id) > after)]
    page = rows[:limit]
    more = len(rows) > limit
    return SessionList(data=page, has_more=more,
                       next_cursor=_encode_cursor(page[-1].created, page[-1].id) if more else None)


def _label(value: object) -> str:
    """A metadata value as a filter compares it: strings as they are, the rest as JSON (3, true)."""
    return value if isinstance(value, str) else json.dumps(value)


def _metadata_filter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ApiError("invalid_request", f"metadata filter {text!r} is not KEY=VALUE")
    return key, value


def _encode_cursor(created: float, sid: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, sid]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, sid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(sid)
    except (ValueError, TypeError) as e:
        raise ApiError("invalid_request", "cursor is not one this server gave") from e


@router.patch("/{sid}", response_model=SessionOut, responses=JSON_GEN_ERRORS)
async def update_session(req: SessionPatch, sid: SessionIdDep, who: TenantDep,
                         services: ServicesDep) -> SessionOut:
    """Change the session's ``ttl_s`` (null: none; counted from now), ``sliding_ttl``, ``name``,
    ``metadata`` (replaced whole). Fields left out stay; the state is never touched, also while an
    ingest runs."""
    given = req.model_fields_set
    labels: dict[str, Any] = {}
    if "name" in given:
        labels["name"] = req.name
    if "metadata" in given:
        labels["metadata"] = req.metadata or None
    if "sliding_ttl" in given:
        labels["sliding_ttl"] = req.sliding_ttl or None
    ttl: int | None | Keep = req.ttl_s if "ttl_s" in given else KEEP
    return SessionOut.of(await services.runtime.update_session(sid, who, labels, ttl_s=ttl))


STATE_FILE_DOC = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


@router.get("/{sid}/state", response_class=StreamingResponse, responses={**GEN_ERRORS, 200: STATE_FILE_DOC})
async def export_state(sid: SessionIdDep, who: TenantDep, services: ServicesDep,
                       metrics: MetricsDep) -> StreamingResponse:
    """The session's committed state as one file (safetensors with the session's manifest:
    docs/formats.md, "Session files"), for POST /v1/sessions/import on this or another server."""
    data = await services.runtime.export_session(sid, who)
    metrics.session_exports.inc()

    async def pieces() -> AsyncIterator[bytes]:
        view = memoryview(data)
        for i in range(0, len(view), EXPORT_PIECE):
            yield bytes(view[i:i + EXPORT_PIECE])

    return StreamingResponse(pieces(), media_type="application/octet-stream", headers={
        "Content-Length": str(len(data)),
        "Content-Disposition": f'attachment; filename="{sid}.atlas-session"'})


IMPORT_BODY = {"requestBody": {"required": True, "description": "A session file (GET .../state).",
                               "content": STATE_FILE_DOC["content"]}}


@router.post("/import", status_code=201, response_model=SessionOut, openapi_extra=IMPORT_BODY,
             responses={**GEN_ERRORS, 413: ERRORS[404]})
async def import_state(request: Request, who: TenantDep, services: ServicesDep, settings: SettingsDep,
                       metrics: MetricsDep,
                       ttl_s: int | None = Query(None, ge=1, le=MAX_TTL_S, description="The new "
                                                 "session's TTL (default: none).")) -> SessionOut:
    """A new session of the caller from a session file, identical to the exported one. Refused
    with 400 ``invalid_session_file`` (truncated, altered, another format, unexpected tensors or
    values), 409 ``foreign_model``, 413 ``body_too_large`` (over the model's state size: checked
    while the body streams in), 429 ``too_many_sessions``."""
    limit = services.atlas.state_bytes + session_file.MAX_HEADER_BYTES
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        metrics.session_import_refusals.labels("oversized").inc()
        raise ApiError("body_too_large", f"a session file of this model is at most {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            metrics.session_import_refusals.labels("oversized").inc()
            raise ApiError("body_too_large", f"a session file of this model is at most {limit} bytes")
    try:
        meta = await services.runtime.import_session(who, bytes(body), ttl_s=ttl_s,
                                                     max_sessions=settings.max_sessions_per_tenant)
    except session_file.SessionFileError as e:
        metrics.session_import_refusals.labels(e.reason).inc()
        raise
    metrics.session_imports.inc()
    return SessionOut.of(meta)


@router.get("/{sid}", response_model=SessionOut, responses=ERRORS)
async def get_session(sid: SessionIdDep, who: TenantDep, services: ServicesDep) -> SessionOut:
    """A session's counters: resume an ingest from ``bytes_committed``."""
    return SessionOut.of(await services.runtime.get_session(sid, who))


@router.delete("/{sid}", status_code=204, response_class=Response, responses=GEN_ERRORS)
async def delete_session(sid: SessionIdDep, who: TenantDep, services: ServicesDep) -> Response:
    await services.runtime.delete_session(sid, who)
    return Response(status_code=204)


@router.post("/{sid}/fork", status_code=201, response_model=SessionOut, responses=GEN_ERRORS)
async def fork_session(sid: SessionIdDep, who: TenantDep, services: ServicesDep,
                       settings: SettingsDep) -> SessionOut:
    """A new session that starts from this one's committed state; counted against
    ATLAS_MAX_SESSIONS_PER_TENANT like a create."""
    return SessionOut.of(await services.runtime.fork(sid, who, settings.max_sessions_per_tenant))


INGEST_BODY = {"requestBody": {"required": True, "description": "The document (UTF-8 text), streamed.",
                               "content": {"text/plain": {"schema": {"type": "string"}}}}}


class _CappedBody:
    """The request body as it arrives, ending quietly after `limit` bytes (a piece that crosses the
    limit is cut there: the document ends at exactly `limit` bytes) or when the client goes away.
    It never raises into the runtime: a body that fails ends the document there (the runtime commits
    what it read), and the route reports why (`over_limit`: 413 / an error event; client gone: the
    event stream sees the disconnect and cancels the work)."""

    def __init__(self, request: Request, limit: int) -> None:
        self.request, self.limit = request, limit
        self.over_limit = False
        self.read = asyncio.Event()  # set once the body is consumed: the response may then start

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        try:
            async for piece in self.request.stream():
                if total + len(piece) > self.limit:  # the part under the limit is read and kept
                    self.over_limit = True
                    if head := piece[:self.limit - total]:
                        yield head
                    return
                total += len(piece)
                if piece:
                    yield piece
        except ClientDisconnect:
            return
        finally:
            self.read.set()


def _too_large(limit: int, bytes_committed: int) -> ApiError:
    return ApiError("body_too_large", f"an ingest body may carry at most {limit} bytes; the session "
                    f"keeps what was read before the limit: bytes_committed {bytes_committed}, resume "
                    "from there with ?offset=")


async def _ingest_events(first: IngestProgress, progress: AsyncGenerator[IngestProgress, None],
                         body: _CappedBody, limit: int, interval_s: float,
                         metrics: Metrics) -> AsyncIterator[bytes]:
    """Progress events, at most one per `interval_s` and always the last, then close the ingest."""
    t0, emitted = time.perf_counter(), 0.0
    try:
        p = first
        while True:
            now = time.perf_counter()
            if p.done and body.over_limit:
                yield sse(_too_large(limit, p.bytes_committed).event())
            elif p.done or now - emitted >= interval_s:
                emitted = now
                if p.done:
                    metrics.ingest_rate.observe(p.tokens_per_s)
                yield sse(IngestEvent(session_id=p.session_id, bytes_committed=p.bytes_committed,
                                      tokens=p.tokens, tokens_per_s=round(p.tokens_per_s, 1),
                                      done=p.done).model_dump())
            try:
                p = await progress.__anext__()
            except StopAsyncIteration:
                break
    except Exception as e:
        yield sse(error_event(e))
    finally:
        with anyio.CancelScope(shield=True):
            await progress.aclose()
        metrics.ingest_seconds.observe(time.perf_counter() - t0)


@router.post("/{sid}/ingest", response_class=EventStream, openapi_extra=INGEST_BODY,
             responses={**GEN_ERRORS, 200: SSE_DOC, 413: ERRORS[404]})
async def ingest(request: Request, sid: SessionIdDep, who: TenantDep, services: ServicesDep,
                 settings: SettingsDep, metrics: MetricsDep,
                 offset: int | None = Query(None, ge=0, le=session_file.MAX_BYTES_COMMITTED,
                                            description="Where this body starts in the document "
                                                        "(default: after what the session has).")
                 ) -> EventStream:
    """Stream a document into the session. The body is read as it arrives (never held whole);
    events report progress (``bytes_committed``, ``tokens``, ``tokens_per_s``) and the last one,
    ``done: true``, the totals. Bytes before ``bytes_committed`` are skipped (a resumed upload is
    idempotent); an offset past it is 409 ``offset_gap``. If the client goes away, the session keeps
    what was read until then: resume from its ``bytes_committed``."""
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError("body_too_large", f"an ingest body may carry at most {limit} bytes; "
                       "send the document in several requests with ?offset=")
    meta = await services.runtime.get_session(sid, who)
    if offset is not None and offset > meta.bytes_committed:
        raise ApiError("offset_gap", f"offset {offset} is past the {meta.bytes_committed} bytes the "
                       f"session has; resume from {meta.bytes_committed}")
    body = _CappedBody(request, limit)
    progress = services.runtime.ingest(sid, who, aiter(body), offset=offset)
    try:  # failures before any progress are plain HTTP errors
        first = await progress.__anext__()
    except BaseException:
        await progress.aclose()
        raise
    if first.done and body.over_limit:
        raise _too_large(limit, first.bytes_committed)
    events = _ingest_events(first, progress, body, limit, settings.progress_interval_s, metrics)
    return EventStream(events, body_read=body.read)


@router.post("/{sid}/generate", response_class=EventStream, responses={**JSON_GEN_ERRORS, 200: SSE_DOC})
async def generate(req: GenerateRequest, sid: SessionIdDep, who: TenantDep, services: ServicesDep,
                   settings: SettingsDep, metrics: MetricsDep) -> EventStream:
    """Continue the session after ``prompt``; events ``{"text", "token"}`` then
    ``{"done": true, "finish_reason", "usage", "session"}``. By default the exchange runs on a fork
    and the session stays as it was; ``commit: true`` appends prompt and answer to it."""
    params = sampling(req, 128, settings, defaults=services.atlas.generation_defaults)
    ids = prompt_ids(services.atlas, req.prompt, settings)
    await services.runtime.get_session(sid, who)
    stream = await primed(generation(services.runtime, metrics, sid, who, ids, params, req.commit,
                                     settings.request_timeout_s))

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, Finished):
                    done = GenerateDoneEvent(
                        finish_reason=item.finish_reason,
                        usage=Usage(prompt_tokens=item.prompt_tokens,
                                    completion_tokens=item.completion_tokens,
                                    total_tokens=item.prompt_tokens + item.completion_tokens),
                        session=SessionOut.of(item.session) if item.session else None)
                    yield sse(done.model_dump())
                elif isinstance(item, Token):  # (no prompt log-probabilities are asked for here)
                    yield sse({"text": item.text, "token": item.id})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            await stream.aclose()

    return EventStream(events())
