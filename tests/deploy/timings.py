"""What the image tests measured, printed at the end of the run and saved under test-artifacts/."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIMINGS: dict[str, float | str] = {}
ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "image-test-timings.json"


@contextmanager
def timed(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    TIMINGS[name] = round(time.perf_counter() - start, 2)


def render() -> list[str]:
    width = max(map(len, TIMINGS))
    return [f"  {k:<{width}}  {v} s" if isinstance(v, float) else f"  {k:<{width}}  {v}"
            for k, v in TIMINGS.items()]


def save() -> Path:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(TIMINGS, indent=2) + "\n")
    return ARTIFACT
