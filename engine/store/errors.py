"""Typed store errors.

Each error carries a stable string ``code`` (part of the HTTP API's error shape); the HTTP status of
each code is the server's business (``server/errors.py``), not the store's.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the session store raises on purpose."""

    code: str = "store_error"

    def __init__(self, message: str, *, sid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sid = sid


class StateNotFoundError(StoreError):
    """The session does not exist (never created, deleted, or expired by its TTL)."""

    code = "session_not_found"


#: Alias: the HTTP layer talks about sessions, the engine about states.
SessionNotFoundError = StateNotFoundError


class NoStateError(StateNotFoundError):
    """The session exists but no state was ever committed to it (generation 0)."""

    code = "state_not_found"


class SessionExistsError(StoreError):
    """``create`` was asked for an id that is already taken."""

    code = "session_exists"


class TooManySessionsError(StoreError):
    """The tenant already holds as many sessions as it may (a create, fork or import)."""

    code = "too_many_sessions"


class StateCorruptError(StoreError):
    """A part is missing, truncated or fails its checksum, or the manifest is unreadable.

    The state is refused, never served; other sessions are unaffected."""

    code = "state_corrupt"


class ForeignModelError(StoreError):
    """The stored state was made by another model (fingerprint mismatch)."""

    code = "foreign_model"


class LeaseConflictError(StoreError):
    """Another writer holds the session's lease, or this writer's fence is stale.

    Also raised when a concurrent unfenced commit moved the session on first (lost-update guard).
    ``retry_after_ms``: how long the holder's lease has left, when another writer holds it (None
    when there is no lease to wait for: a stale fence, a concurrent commit)."""

    code = "lease_conflict"

    def __init__(self, message: str, *, sid: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message, sid=sid)
        self.retry_after_ms = retry_after_ms


class StoreUnavailableError(StoreError):
    """Redis cannot be reached or answered with an error; the caller may retry later."""

    code = "store_unavailable"


class StoreFullError(StoreUnavailableError):
    """Redis refuses writes: it is at its `maxmemory` (with `noeviction`, as sessions need). Waiting
    does not help; deleting sessions, or more memory, does."""

    code = "store_full"
