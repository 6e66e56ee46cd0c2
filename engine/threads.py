"""How many CPU threads torch computes with: a choice that holds when other processes want the cores.

torch's default is one intra-op thread per core the machine has. For the small matrices of a small
model every operator then forks and joins all of them, and as soon as another process takes a core,
each join waits for a thread the scheduler has parked: ingest fell from ~19,000 to 360-1,200 tok/s
beside a single busy process (issue 27), while one thread stayed at 12,000-20,000. So the choice is:

- the cores really available: the CPU affinity mask (`os.sched_getaffinity`) and the cgroup's CPU
  quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), whichever is smaller;
  `os.cpu_count()` counts the host's cores, not the container's;
- one thread per `PARAMS_PER_THREAD` parameters of the model, at least one, at most those cores:
  a model below that size runs single-threaded, where contention costs it only its own core's share;
- `ATLAS_THREADS` (or the older `ATLAS_TORCH_THREADS`) overrides both.

Threads waiting at a join must sleep, not spin on a core another thread needs: `OMP_WAIT_POLICY=PASSIVE`
(libgomp, which torch's CPU wheels load) and `KMP_BLOCKTIME=0` (Intel OpenMP). The OpenMP runtime
reads them once, when torch is imported, so `set_openmp_env()` must run before the first
`import torch` of the process (the `atlas` command line does it first thing). This module itself
imports torch only inside `apply_thread_policy`; it is importable without torch only through its
file, since `atlas.engine`'s package imports torch. Where the variables came too late, a choice of one
thread needs no wait policy (no parallel region runs); a choice of more is logged as spinning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_log = logging.getLogger(__name__)

#: Parameters per intra-op thread. Below this size one thread: the 158k demo model ingests as fast on
#: one thread as on two, and the 4.6M default model, though ~1.7x faster on two threads of an idle
#: 2-core machine, falls to 0.06x of that beside one busy process, where one thread keeps ~0.6x
#: (docs/performance.md). The paper's 170M model gets 7 threads where 7 cores are usable.
PARAMS_PER_THREAD = 25_000_000

#: The OpenMP settings that make waiting threads sleep (set only where the environment has none).
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


class ThreadSettings(BaseSettings):
    """`ATLAS_THREADS`: torch intra-op threads (unset: the policy above). `ATLAS_TORCH_THREADS`, the
    server's older name, is accepted too; `ATLAS_THREADS` wins when both are set."""

    model_config = SettingsConfigDict(env_prefix="ATLAS_", extra="ignore")

    threads: int | None = Field(None, ge=1,
                                validation_alias=AliasChoices("ATLAS_THREADS", "ATLAS_TORCH_THREADS"))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # intra-op threads set
    usable_cores: int  # min(affinity, cgroup quota), at least 1
    affinity: int | None  # CPUs in the affinity mask (None: not known on this platform)
    quota: float | None  # the cgroup's CPU quota in cores (None: unlimited or no cgroup)
    source: str  # "override" (ATLAS_THREADS or an argument) or "policy"
    wait_policy: str | None  # OMP_WAIT_POLICY as the environment holds it


def set_openmp_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Make OpenMP's waiting threads sleep. Only before the first `import torch` does it take
    effect; values already in the environment are kept (an operator may want spinning)."""
    env = os.environ if environ is None else environ
    for key, value in OPENMP_ENV.items():
        env.setdefault(key, value)


def affinity_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """The process's cgroup path for v2 (the `0::` line) and for v1's cpu controller."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _ancestors(base: Path, path: str | None) -> list[Path]:
    """base/path, its parents up to base (limits nest: the smallest applies), and base itself. In a
    container the recorded path often is the host's while base is the container's own cgroup."""
    out: list[Path] = []
    rel = Path((path or "/").lstrip("/"))
    while True:
        out.append(base / rel)
        if rel == Path("."):
            return out
        rel = rel.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota in cores (quota / period) of the process's cgroup and its ancestors, the
    smallest; None when there is none."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    quotas: list[float] = []
    for d in _ancestors(root, v2):  # v2: "max 100000" or "<quota> <period>"
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period and float(period) > 0:
                quotas.append(float(quota) / float(period))
    for controller in ("cpu", "cpu,cpuacct"):  # v1: cfs_quota_us is -1 without a limit
        for d in _ancestors(root / controller, v1):
            quota_s, period_s = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota_s and period_s and float(quota_s) > 0 and float(period_s) > 0:
                quotas.append(float(quota_s) / float(period_s))
    return min(quotas) if quotas else None


def choose_threads(model_params: int | None, affinity: int | None, quota: float | None,
                   override: int | None = None) -> tuple[int, int]:
    """(threads, usable cores). A quota of 1.5 cores gives 1: a second thread would be throttled
    half the time, and every join would wait for it."""
    usable = affinity or os.cpu_count() or 1
    if quota is not None:
        usable = min(usable, max(1, math.floor(quota)))
    usable = max(1, usable)
    if override is not None:
        return override, usable
    if model_params is None:
        return usable, usable
    return max(1, min(usable, math.ceil(model_params / PARAMS_PER_THREAD))), usable


def apply_thread_policy(model_params: int | None = None, override: int | None = None, *,
                        cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> ThreadChoice:
    """Choose and set torch's intra-op threads for a model of `model_params` parameters (None:
    unknown, all usable cores). `override` (a command-line value) wins over `ATLAS_THREADS`, which
    wins over the policy."""
    import torch

    override = override if override is not None else ThreadSettings().threads
    affinity, quota = affinity_cpus(), cgroup_quota(cgroup_root, proc_cgroup)
    threads, usable = choose_threads(model_params, affinity, quota, override)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    wait = os.environ.get("OMP_WAIT_POLICY")
    source = "override" if override is not None else "policy"
    choice = ThreadChoice(threads, usable, affinity, quota, source, wait)
    if threads > 1 and (wait or "").upper() != "PASSIVE":
        _log.warning("%d torch threads with OMP_WAIT_POLICY=%s: waiting threads spin; set "
                     "OMP_WAIT_POLICY=PASSIVE before torch is imported", threads, wait or "unset")
    _log.info("torch threads: %s", choice)
    return choice
