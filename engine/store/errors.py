"""Typed store errors.

Each error carries a stable string ``code`` (part of the HTTP API's error shape) and a suggested
``http_status``, so the server maps any :class:`StoreError` to one JSON error without knowing the
store's internals.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the session store raises on purpose."""

    code: str = "store_error"
    http_status: int = 500

    def __init__(self, message: str, *, sid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sid = sid

    def to_dict(self) -> dict[str, str]:
        """The JSON error body the server returns (``{"code", "message"}``)."""
        return {"code": self.code, "message": self.message}


class StateNotFoundError(StoreError):
    """The session does not exist (never created, deleted, or expired by its TTL)."""

    code = "session_not_found"
    http_status = 404


#: Alias: the HTTP layer talks about sessions, the engine about states.
SessionNotFoundError = StateNotFoundError


class NoStateError(StateNotFoundError):
    """The session exists but no state was ever committed to it (generation 0)."""

    code = "state_not_found"
    http_status = 404


class SessionExistsError(StoreError):
    """``create`` was asked for an id that is already taken."""

    code = "session_exists"
    http_status = 409


class StateCorruptError(StoreError):
    """A part is missing, truncated or fails its checksum, or the manifest is unreadable.

    The state is refused, never served; other sessions are unaffected."""

    code = "state_corrupt"
    http_status = 500


class ForeignModelError(StoreError):
    """The stored state was made by another model (fingerprint mismatch)."""

    code = "foreign_model"
    http_status = 409


class LeaseConflictError(StoreError):
    """Another writer holds the session's lease, or this writer's fence is stale.

    Also raised when a concurrent unfenced commit moved the session on first (lost-update guard)."""

    code = "lease_conflict"
    http_status = 409


class StoreUnavailableError(StoreError):
    """Redis cannot be reached or answered with an error; the caller may retry later."""

    code = "store_unavailable"
    http_status = 503
