"""Errors the SDK raises: the server's ``{"error": {"code", "message"}}`` as exceptions.

One class per outcome a caller handles differently (and the CLI maps each to its own exit code),
so callers never parse messages.
"""

from __future__ import annotations

from typing import Any

import httpx


class AtlasError(Exception):
    """A request failed. ``status`` is the HTTP status (0 when no answer came), ``code`` the server's
    stable error code (``session_not_found``, ``offset_gap``, ...)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Unauthorized(AtlasError):
    """401: a missing or wrong API key."""


class NotFound(AtlasError):
    """404: no such session (for this tenant), route or model."""


class Conflict(AtlasError):
    """409: offset gap, another writer holds the session, or its stored state cannot be used."""


class Busy(AtlasError):
    """429 / 503: the server is full, loading or draining; retried with backoff before raised."""


class Unreachable(AtlasError):
    """No answer: the connection failed or dropped, or timed out."""


_BY_STATUS: dict[int, type[AtlasError]] = {401: Unauthorized, 404: NotFound, 409: Conflict,
                                           429: Busy, 503: Busy}

#: Error codes that mean "try again later" even inside an event stream that already started.
RETRYABLE_CODES = {"queue_full", "lease_conflict", "store_unavailable", "shutting_down", "not_ready"}
#: Busy answers that waiting does not clear: the tenant must delete sessions first.
FINAL_CODES = {"too_many_sessions"}


def _retry_after(headers: httpx.Headers | None) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_from_body(status: int, body: Any, headers: httpx.Headers | None = None) -> AtlasError:
    """The exception for an error answer (or an ``{"error": ...}`` event: pass its status as 0
    and let the code pick the class)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message = str(err.get("code", "")), str(err.get("message", ""))
    else:
        code, message = f"http_{status}", str(body)[:500]
    if not status and isinstance(err, dict) and isinstance(err.get("status"), int):
        status = err["status"]  # an event stream's error says what its status would have been
    if not status:  # (servers before that: the codes a stream can end with)
        status = {"session_not_found": 404, "offset_gap": 409, "lease_conflict": 409, "state_corrupt": 409,
                  "foreign_model": 409, "queue_full": 429, "store_unavailable": 503,
                  "shutting_down": 503, "not_ready": 503}.get(code, 500)
    cls = _BY_STATUS.get(status, AtlasError)
    return cls(status, code, message, _retry_after(headers))


def error_from_response(response: httpx.Response) -> AtlasError:
    """The exception for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, response.headers)
