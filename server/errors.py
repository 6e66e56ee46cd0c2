"""One error shape for every failure: ``{"error": {"code": "...", "message": "...", "request_id": "..."}}``.

``STATUS`` is the one table from error code to HTTP status (README.md, "Errors", lists it): the
engine's errors (store, state, runtime) carry only their stable code, the routes raise
:class:`ApiError` with one, and this module alone decides the status. Inside an event stream, where
the status line is already sent, the same object is sent as an event instead. Only a bug reaches
the catch-all 500 ``internal_error``. ``request_id`` is the id of the request (X-Request-ID, also on
every response's headers and log lines: ``logs.py``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from atlas.engine.chat_template import ChatTemplateError
from atlas.engine.checkpoint import CheckpointError
from atlas.engine.runtime import RuntimeFault
from atlas.engine.state import StateError
from atlas.engine.store import LeaseConflictError, StoreError

from .logs import current_request_id

log = logging.getLogger("atlas.server")

#: The HTTP status of every error code. A session whose stored state cannot be used (corrupt,
#: another model's) is a conflict with that resource, not a server fault: the server lives on and
#: the client can delete or re-create the session.
STATUS: dict[str, int] = {
    "bad_request": 400,
    "cors_not_allowed": 400,  # a CORS preflight from an origin (or asking a method) not allowed
    "token_out_of_vocabulary": 400,
    "chat_template_error": 400,  # the model's chat template refused the messages (or cannot compile)
    "client_disconnected": 400,
    "unsupported_parameter": 400,
    "max_tokens_too_large": 400,
    "prompt_too_long": 400,
    "unauthorized": 401,
    "not_found": 404,
    "route_not_found": 404,  # no route at this path under /v1: the message lists the served ones
    "session_not_found": 404,
    "state_not_found": 404,
    "model_not_found": 404,
    "baseline_unavailable": 404,  # the demo has no attention-only baseline here (the message says why)
    "method_not_allowed": 405,
    "session_exists": 409,
    "offset_gap": 409,
    "lease_conflict": 409,
    "state_corrupt": 409,
    "invalid_session_file": 400,
    "state_invalid": 409,
    "foreign_model": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "queue_full": 429,
    "too_many_sessions": 429,
    "internal_error": 500,
    "runtime_error": 500,
    "not_ready": 503,
    "shutting_down": 503,
    "store_unavailable": 503,
    "store_error": 503,  # an unexpected reply from the store: treated like an unreachable one
    "store_full": 507,  # Redis at its maxmemory refuses writes: retrying does not help
    "checkpoint_invalid": 503,  # the model cannot load (at start-up: /ready says why)
    "demo_prose_invalid": 503,  # ATLAS_DEMO_PROSE cannot be read as prose (too short, not text)
}

#: Seconds a client should wait before retrying an engine error with this code.
RETRY_AFTER: dict[str, int] = {"queue_full": 1, "store_unavailable": 1, "store_error": 1, "shutting_down": 5}

#: The base classes of the errors the engine raises on purpose; each subclass carries a ``code``.
ENGINE_ERRORS: tuple[type[Exception], ...] = (RuntimeFault, StoreError, StateError, CheckpointError,
                                              ChatTemplateError)

#: Status codes Starlette raises itself (unknown route, wrong method, ...) -> our codes.
HTTP_CODES: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
    413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
}


_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The error object, with the id of the request it answers (from the context: every error of a
    request, in a response or in its event stream, carries it)."""
    rid = current_request_id()
    # A message may quote what the client sent, and JSON lets a client send a lone surrogate
    # ("\ud800"), which UTF-8 cannot encode: it is written as its escape instead.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"code": code, "message": message, **({"request_id": rid} if rid else {})}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


class ApiError(Exception):
    """An error the API returns on purpose: a code of ``STATUS`` and a message for people."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = STATUS[code]  # a code missing from the table is a bug: fail where it is raised
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return error_body(self.code, self.message)

    def event(self) -> dict[str, dict[str, Any]]:
        """The body as the last event of a stream whose status line said 200: with the status the
        error would have had (a client raises what it would have raised for that answer)."""
        out: dict[str, dict[str, Any]] = dict(self.body())
        out["error"]["status"] = self.status
        return out

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def to_api_error(exc: BaseException) -> ApiError | None:
    """The API error for an exception the engine, the store or FastAPI raises on purpose."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ENGINE_ERRORS):
        code: str = getattr(exc, "code", "")
        if code not in STATUS:
            log.error("engine error code %r has no HTTP status", code)
            return None
        retry = RETRY_AFTER.get(code)
        if isinstance(exc, LeaseConflictError) and exc.retry_after_ms is not None:
            retry = max(1, math.ceil(exc.retry_after_ms / 1000))  # when the holder's lease runs out
        return ApiError(code, str(exc) or code, {"Retry-After": str(retry)} if retry else None)
    if isinstance(exc, RequestValidationError | ValidationError):
        return ApiError("invalid_request", validation_message(exc))
    if isinstance(exc, ClientDisconnect):
        return ApiError("client_disconnected", "the client went away before the request was read")
    return None


#: The tags pydantic puts in an error's location for the member of a union (or the validator) that
#: failed: ``str``, ``list[int]``, ``function-after[functools.partial(<function ... at 0x7f...>)]``.
#: They name no field of the request (and carry reprs with memory addresses): left out.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict", "tuple",
                        "set", "model", "literal", "json-or-python", "is-instance", "union"})
_TAG = re.compile(r"^[a-z][a-z0-9_-]*\[.*\]$", re.S)
_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def _loc_part(x: object) -> str | None:
    text = str(x)
    if isinstance(x, str) and (text == "body" or _TAG.match(text) or text in _TYPE_TAGS):
        return None
    return text


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """``field.sub: what is wrong`` for the first few errors, e.g. ``max_tokens: Input should be a
    valid integer``; no union tags, no Python reprs."""
    parts: list[str] = []
    for e in exc.errors():
        loc = list(e.get("loc", ()))
        # an unknown or missing key is the client's own name (even "str"): keep the last part as is
        last = [loc.pop()] if loc and e.get("type") in ("extra_forbidden", "missing") else []
        names = [p for x in loc if (p := _loc_part(x)) is not None]
        names += [str(x) for x in last]
        msg = _REPR.sub("<object>", str(e.get("msg", "invalid")))
        where = _REPR.sub("<object>", ".".join(names))
        part = f"{where}: {msg}" if where else msg
        if part not in parts:
            parts.append(part)
        if len(parts) == 5:
            break
    return "; ".join(parts) or "invalid request"


def internal_error() -> ApiError:
    return ApiError("internal_error", "internal error; see the server log")


def error_event(exc: BaseException) -> dict[str, dict[str, Any]]:
    """The error object sent inside an event stream (whose status line is already 200), with the
    status the error would have had (ApiError.event)."""
    err = to_api_error(exc)
    if err is None:
        log.exception("unexpected error in a stream", exc_info=exc)
        err = internal_error()
    return err.event()


def served_routes(openapi: dict[str, Any], prefix: str = "/v1") -> list[str]:
    """``POST /v1/completions``, ... for every documented route under ``prefix``, OpenAI's first
    (what a client that got the path wrong most likely meant), then in the app's order. Read from
    the app's OpenAPI document (cached by FastAPI): what it says is what the router serves."""
    found: list[tuple[tuple[bool, bool], str]] = []
    for path, operations in openapi.get("paths", {}).items():
        if path != prefix and not path.startswith(prefix + "/"):
            continue
        for method, op in operations.items():
            if method.upper() in _METHODS:
                openai = "openai" in op.get("tags", [])
                key = (not openai, not (openai and method.upper() == "POST"))
                found.append((key, f"{method.upper()} {path}"))
    return [name for _, name in sorted(found, key=lambda x: x[0])]  # stable: keeps the app's order


def allowed_methods(openapi: dict[str, Any], path: str) -> list[str]:
    """The methods the documented routes serve at ``path`` (templates such as ``{sid}`` match one
    segment). Starlette's own Allow header names only the first route it matched at the path."""
    methods: list[str] = []
    for template, operations in openapi.get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods += [m.upper() for m in operations if m.upper() in _METHODS and m.upper() not in methods]
    return methods


def route_not_found(request: Request) -> ApiError:
    listing = ", ".join(served_routes(request.app.openapi())) or "none"
    return ApiError("route_not_found", f"no route {request.method} {request.url.path[:200]}; "
                    f"served routes: {listing}")


def unexpected_response(request: Request, exc: BaseException) -> JSONResponse:
    """The answer to an exception no handler took: its API error if it has one (e.g. a StoreError
    raised under a middleware), else 500 ``internal_error``, logged with its traceback."""
    err = to_api_error(exc)
    if err is not None:
        return err.response()
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


def install_handlers(app: FastAPI) -> None:
    """Every failure leaves as the one JSON error shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        if err is None:  # an engine error with a code missing from STATUS
            return await unexpected(request, exc)
        return err.response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        unmatched = "route" not in request.scope
        if exc.status_code == 404 and unmatched and (path == "/v1" or path.startswith("/v1/")):
            return route_not_found(request).response()  # no route matched: say which ones exist
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.openapi(), path) or \
                [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
            if allowed:
                headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
                return error_response(405, "method_not_allowed", f"{path[:200]} does not take "
                                      f"{request.method}; it takes {', '.join(allowed)}", headers)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # app.py's CatchAll answers first (inside the CORS and request-id middleware); this is
        # Starlette's outermost net, for an exception raised by that middleware itself.
        return unexpected_response(request, exc)

    handled: tuple[type[Exception], ...] = (ApiError, *ENGINE_ERRORS, RequestValidationError, ValidationError,
                                            ClientDisconnect)
    for cls in handled:
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
