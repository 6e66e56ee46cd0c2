"""Counters of the runtime, read by the metrics and the benchmarks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RuntimeStats:
    steps: int = 0
    decode_tokens: int = 0
    ingest_tokens: int = 0  # fed by feed steps: documents and prompts
    document_tokens: int = 0  # committed into sessions by ingests (each token once)
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    peak_feed_batch: int = 0  # most sessions fed in one batch
    peak_decode_batch: int = 0  # most sessions decoded in one batch
    running: int = 0  # jobs the worker holds
    admitted: int = 0  # requests admitted (running or waiting for their session)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]
