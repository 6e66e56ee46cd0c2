"""The engine runtime: many sessions at once, batched on one device, cancellable."""

from .errors import OffsetGapError, QueueFullError, RuntimeFault, ShuttingDownError
from .scheduler import GenerationDone, IngestProgress, Runtime, RuntimeStats, percentile
from .settings import RuntimeSettings

__all__ = [
    "GenerationDone", "IngestProgress", "OffsetGapError", "QueueFullError", "Runtime", "RuntimeFault",
    "RuntimeSettings", "RuntimeStats", "ShuttingDownError", "percentile",
]
