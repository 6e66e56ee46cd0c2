"""One error shape for every failure: ``{"error": {"code": "...", "message": "..."}}``.

Engine and store errors carry a stable ``code``; this module maps each to its HTTP status (the table
is in README.md, "HTTP API"). Inside an event stream, where the status line is already sent, the
same object is sent as an event instead. Only a bug reaches the catch-all 500 ``internal_error``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from atlas.engine.runtime import QueueFullError, RuntimeFault
from atlas.engine.state import StateError
from atlas.engine.store import StoreError

log = logging.getLogger("atlas.server")

#: Status of each store / state error code. A session whose stored state cannot be used (corrupt,
#: another model's) is a conflict with the resource, not a server fault: the server lives on and
#: the client can delete or re-create the session.
STORE_STATUS: dict[str, int] = {
    "session_not_found": 404,
    "state_not_found": 404,
    "session_exists": 409,
    "state_corrupt": 409,
    "state_invalid": 409,
    "foreign_model": 409,
    "lease_conflict": 409,
    "store_unavailable": 503,
}

#: Status codes Starlette raises itself (unknown route, wrong method, ...) -> our codes.
HTTP_CODES: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
    413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
}


class ApiError(Exception):
    """An error the API returns on purpose, with its status and stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> ApiError | None:
    """The API error for an exception the engine, the store or FastAPI raises on purpose."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RuntimeFault):
        headers = {"Retry-After": "1"} if isinstance(exc, QueueFullError) else None
        if exc.status == 503:
            headers = {"Retry-After": "5"}
        return ApiError(exc.status, exc.code, str(exc) or exc.code, headers)
    if isinstance(exc, StoreError):
        status = STORE_STATUS.get(exc.code, 503)
        headers = {"Retry-After": "1"} if status == 503 else None
        return ApiError(status, exc.code, exc.message, headers)
    if isinstance(exc, StateError):  # state bytes that passed the store's checks but not the model's
        return ApiError(STORE_STATUS.get(exc.code, 409), exc.code, str(exc))
    if isinstance(exc, RequestValidationError | ValidationError):
        return ApiError(422, "invalid_request", validation_message(exc))
    if isinstance(exc, ClientDisconnect):
        return ApiError(400, "client_disconnected", "the client went away before the request was read")
    return None


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def error_event(exc: BaseException) -> dict:
    """The error object sent inside an event stream (whose status line is already 200)."""
    err = to_api_error(exc)
    if err is None:
        log.exception("unexpected error in a stream", exc_info=exc)
        err = ApiError(500, "internal_error", "internal error; see the server log")
    return err.body()


def install_handlers(app: FastAPI) -> None:
    """Every failure leaves as the one JSON error shape."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        assert err is not None
        return err.response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return ApiError(exc.status_code, code, message, dict(exc.headers or {})).response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)  # e.g. a StoreError raised under a middleware
        if err is not None:
            return err.response()
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal_error", "internal error; see the server log").response()

    for cls in (ApiError, RuntimeFault, StoreError, StateError, RequestValidationError, ValidationError,
                ClientDisconnect):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
