"""Typed errors of the runtime; `code` is stable and reaches API clients."""

from __future__ import annotations


class RuntimeFault(Exception):
    code = "runtime_error"
    status = 500


class QueueFullError(RuntimeFault):
    """Too much work admitted; retry later."""

    code = "queue_full"
    status = 429


class OffsetGapError(RuntimeFault):
    """An ingest offset beyond what the session has committed: bytes would be missing."""

    code = "offset_gap"
    status = 409


class ShuttingDownError(RuntimeFault):
    code = "shutting_down"
    status = 503
