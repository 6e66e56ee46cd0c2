"""Committed results name files by repository-relative paths or plain names, never by where they lay
on the machine that measured them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas.engine.api import BUNDLED_CHECKPOINT
from atlas.engine.machine import MATMUL_CPU_FLAGS, describe_machine, portable_path, with_portable_paths

ROOT = Path(__file__).resolve().parents[1]
# Where files lie on some machine; not "/v1/completions" or whatever a model generated.
MACHINE_PATH = re.compile(
    r"(?:^|\s)(?:/(?:home|root|tmp|work|Users|mnt|opt|var|srv|data)/|~/|[A-Za-z]:[\\/])")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_hold_no_absolute_path(path: Path):
    absolute = [s for s in _strings(json.loads(path.read_text())) if MACHINE_PATH.search(s)]
    assert not absolute, absolute


def test_portable_path_is_relative_to_the_repository_or_a_plain_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert portable_path(BUNDLED_CHECKPOINT) == "engine/assets/demo-model"
    assert portable_path("runs/demo/model") == "runs/demo/model"
    assert portable_path(ROOT / "bench" / ".." / "configs" / "demo.toml") == "configs/demo.toml"
    outside = tmp_path / "data" / "book.txt"
    assert portable_path(outside) == "book.txt"
    assert portable_path(os.path.relpath(outside, ROOT)) == "book.txt"
    monkeypatch.chdir(tmp_path)
    assert portable_path(outside) == "data/book.txt"  # relative to where the command ran


def test_training_records_keep_their_paths_portable_at_every_depth(monkeypatch):
    monkeypatch.chdir(ROOT)
    record = {"steps": 600, "path": str(ROOT / "runs" / "b" / "model"),
              "init_from": {"path": "/elsewhere/runs/a/model", "tasks": {"passkey": 1.0}}}
    assert with_portable_paths(record) == {"steps": 600, "path": "runs/b/model",
                                           "init_from": {"path": "model", "tasks": {"passkey": 1.0}}}
    assert with_portable_paths(None) is None


def test_machine_description_names_the_cpu_features_products_use() -> None:
    """Results say which matrix units the CPU had: bf16 figures mean little without them."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    line = next((x for x in lines if x.startswith("flags")), None)
    flags = describe_machine()["cpu_flags"]
    if line is None:  # not Linux on x86
        assert flags is None
    else:
        assert flags == [f for f in MATMUL_CPU_FLAGS if f in line.split(":", 1)[1].split()]
