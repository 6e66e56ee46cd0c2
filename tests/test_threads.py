"""The thread policy (engine/threads.py): cgroup quota parsing, the choice by model size, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlas.engine import threads as th


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "fs/kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(tmp_path / "fs/kubepods/pod1/cpu.max", "150000 100000\n")
    write(tmp_path / "fs/kubepods/cpu.max", "400000 100000\n")
    assert th.cgroup_quota(tmp_path / "fs", proc) == 1.5


def test_cgroup_v2_unlimited_and_missing(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/\n")
    write(tmp_path / "fs/cpu.max", "max 100000\n")
    assert th.cgroup_quota(tmp_path / "fs", proc) is None
    assert th.cgroup_quota(tmp_path / "nothing", tmp_path / "no-proc") is None


def test_cgroup_v1_quota_and_its_unlimited_minus_one(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "fs/cpu/docker/abc/cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "fs/cpu/docker/abc/cpu.cfs_period_us", "100000\n")
    assert th.cgroup_quota(tmp_path / "fs", proc) == 2.0
    write(tmp_path / "fs/cpu/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert th.cgroup_quota(tmp_path / "fs", proc) is None


def test_cgroup_v1_inside_a_container_reads_its_own_root(tmp_path):
    # The recorded path is the host's; the container sees its own cgroup at the root.
    proc = tmp_path / "cgroup"
    write(proc, "4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert th.cgroup_quota(tmp_path / "fs", proc) == 0.5


@pytest.mark.parametrize(("params", "affinity", "quota", "override", "expected"), [
    (158_000, 2, None, None, (1, 2)),            # the demo model: one thread
    (4_600_000, 16, None, None, (1, 16)),        # the default model: one thread whatever the machine
    (175_000_000, 16, None, None, (7, 16)),      # 170M: one thread per 25M parameters
    (175_000_000, 16, 3.5, None, (3, 3)),        # ... within the quota, rounded down
    (175_000_000, 2, None, None, (2, 2)),        # ... and the affinity mask
    (175_000_000, 8, 0.5, None, (1, 1)),         # a quota under one core still gets a thread
    (None, 4, None, None, (4, 4)),               # unknown size: every usable core
    (158_000, 2, None, 3, (3, 2)),               # an override is taken as given
])
def test_choice(params, affinity, quota, override, expected):
    assert th.choose_threads(params, affinity, quota, override) == expected


def test_env_override_and_its_old_name(monkeypatch, tmp_path):
    before = torch.get_num_threads()
    try:
        kw = {"cgroup_root": tmp_path / "none", "proc_cgroup": tmp_path / "none"}
        monkeypatch.delenv("ATLAS_THREADS", raising=False)
        monkeypatch.setenv("ATLAS_TORCH_THREADS", "2")
        choice = th.apply_thread_policy(158_000, **kw)
        assert (choice.threads, choice.source) == (2, "override") and torch.get_num_threads() == 2
        monkeypatch.setenv("ATLAS_THREADS", "1")  # the new name wins
        assert th.apply_thread_policy(158_000, **kw).threads == 1 and torch.get_num_threads() == 1
        assert th.apply_thread_policy(158_000, override=2, **kw).threads == 2  # an argument wins
        monkeypatch.delenv("ATLAS_THREADS")
        monkeypatch.delenv("ATLAS_TORCH_THREADS")
        choice = th.apply_thread_policy(158_000, **kw)
        assert (choice.threads, choice.source) == (1, "policy")
        monkeypatch.setenv("ATLAS_THREADS", "0")
        with pytest.raises(ValueError):
            th.apply_thread_policy(158_000, **kw)
    finally:
        torch.set_num_threads(before)


def test_openmp_env_keeps_what_is_set():
    env = {"KMP_BLOCKTIME": "200"}
    th.set_openmp_env(env)
    assert env == {"KMP_BLOCKTIME": "200", "OMP_WAIT_POLICY": "PASSIVE"}
