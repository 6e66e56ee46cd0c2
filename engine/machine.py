"""A description of the machine a figure was measured on (benchmarks and `atlas eval` save it beside
their results: the figures mean little without the hardware, the thread count and the load), and
the paths those results may name."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

# The folder that holds engine/: the repository root in a checkout, the package in an installed copy.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _read_proc(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def load_average() -> list[float] | None:
    """Other processes on the machine slow a CPU run down; the load says how much to trust it."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


#: CPU features that decide the speed of products: AVX-512 for fp32, the bf16 units for bf16
#: (ATLAS_DTYPE=bfloat16, ATLAS_NS_PRECISION=bf16), which are emulated, and slow, without them.
MATMUL_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_matmul_flags() -> list[str] | None:
    """Which of MATMUL_CPU_FLAGS the CPU reports (None where /proc/cpuinfo has no flags)."""
    flags = _read_proc("/proc/cpuinfo", "flags")
    if flags is None:
        return None
    have = set(flags.split())
    return [f for f in MATMUL_CPU_FLAGS if f in have]


def has_bf16_matmul_units() -> bool | None:
    """Whether the CPU multiplies bf16 natively (AMX or AVX512-BF16); None where it cannot be told."""
    flags = cpu_matmul_flags()
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    mem_kb = _read_proc("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "cpu_model": _read_proc("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_flags": cpu_matmul_flags(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def portable_path(path: str | Path) -> str:
    """`path` as results record it: relative to the repository root, else to the working directory,
    else the file's name alone. Where a file lay on one machine means nothing on another, and a
    results file is committed and read everywhere."""
    resolved = Path(path).resolve()
    for base in (SOURCE_ROOT, Path.cwd().resolve()):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return resolved.name


def with_portable_paths(record: Any) -> Any:
    """A copy of a JSON-like record (a checkpoint's training record, say) with every value under a
    "path" key made portable, however deeply nested (each phase's record holds the one before)."""
    if isinstance(record, dict):
        return {key: portable_path(value) if key == "path" and isinstance(value, str)
                else with_portable_paths(value) for key, value in record.items()}
    if isinstance(record, list):
        return [with_portable_paths(item) for item in record]
    return record
