"""Fused Triton kernels for the ATLAS memory (see README.md).

Importing this package does not import Triton: the engine imports it everywhere and asks `available()`
before calling a kernel. Entry points:

- `chunk_scan`: reads, Omega weights, gradients, momentum, Newton-Schulz and the update over many chunks;
- `chunk_update`: the engine's one-chunk optimiser step, fused;
- `memory_read`: the decode-time read, batched over sessions.

Their specification, and the constants they share with it, is the engine's reference chunk step
(`engine/model/reference_step.py`).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


class KernelResourceError(RuntimeError):
    """No tuning of a kernel fits this device's shared memory for this shape (the shape is then
    reported unsupported, so callers fall back to the reference)."""


MIN_TILE = 16  # tl.dot on a GPU takes tiles of at least 16 rows and columns


def is_tile(n: int) -> bool:
    """Whether n is a size tl.dot takes: a power of two >= MIN_TILE."""
    return n >= MIN_TILE and n & (n - 1) == 0


_UNFIT: set[tuple[int, int, int]] = set()


def unfit(depth: int, d: int, e: int) -> None:
    _UNFIT.add((depth, d, e))


@functools.cache
def available() -> bool:
    """Whether Triton is importable (a CUDA device, or TRITON_INTERPRET=1 on CPU, is the caller's check)."""
    return importlib.util.find_spec("triton") is not None


def supported(depth: int, d: int, e: int) -> bool:
    """Memory shapes the chunk kernels take: d and e must be tl.dot tile sizes."""
    return depth in (1, 2) and is_tile(d) and (depth == 1 or is_tile(e)) and (depth, d, e) not in _UNFIT


def chunk_scan(*args: Any, **kwargs: Any) -> Any:
    from .chunk import chunk_scan as run

    return run(*args, **kwargs)


def chunk_update(*args: Any, **kwargs: Any) -> Any:
    from .chunk import chunk_update as run

    return run(*args, **kwargs)


def memory_read(*args: Any, **kwargs: Any) -> Any:
    from .read import memory_read as run

    return run(*args, **kwargs)


__all__ = ["KernelResourceError", "available", "chunk_scan", "chunk_update", "memory_read", "supported"]
