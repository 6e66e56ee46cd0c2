"""The engine runtime: many sessions at once, batched on one device, cancellable.

`Runtime` (runtime.py) is the public face; each request runs as an `IngestTask` (ingest.py) or a
`GenerationTask` (generation.py) whose job (jobs.py) the `Worker` thread (worker.py) steps on the
device; states go in and out of the store through `SessionStates` (states.py).
"""

from .errors import OffsetGapError, QueueFullError, RuntimeFault, ShuttingDownError
from .jobs import GenerationDone, IngestProgress
from .runtime import Runtime
from .settings import RuntimeSettings
from .stats import RuntimeStats, percentile

__all__ = [
    "GenerationDone", "IngestProgress", "OffsetGapError", "QueueFullError", "Runtime", "RuntimeFault",
    "RuntimeSettings", "RuntimeStats", "ShuttingDownError", "percentile",
]
