"""Typed errors of the runtime.

Each carries a stable string ``code`` that reaches API clients; the HTTP status of each code is the
server's business (``server/errors.py``), not the runtime's.
"""

from __future__ import annotations


class RuntimeFault(Exception):
    """Base class of every error the runtime raises on purpose."""

    code: str = "runtime_error"


class QueueFullError(RuntimeFault):
    """Too much work admitted; retry later."""

    code = "queue_full"


class OffsetGapError(RuntimeFault):
    """An ingest offset beyond what the session has committed: bytes would be missing."""

    code = "offset_gap"


class ShuttingDownError(RuntimeFault):
    """The runtime is closing and takes no new work."""

    code = "shutting_down"
