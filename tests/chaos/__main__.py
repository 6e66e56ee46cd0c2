"""``python -m tests.chaos [pytest options]``: the full chaos suite (``pytest -m slow tests/chaos``),
its table printed and saved to bench/results/chaos-cpu.json (``--json PATH`` for another file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = Path("bench") / "results" / "chaos-cpu.json"


def main(argv: list[str]) -> int:
    target = DEFAULT_JSON
    if "--json" in argv:
        i = argv.index("--json")
        target = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    env = {**os.environ, "ATLAS_CHAOS_JSON": str(target if target.is_absolute() else ROOT / target),
           "ATLAS_CHAOS_FULL": "1"}
    cmd = [sys.executable, "-m", "pytest", "-m", "slow", "tests/chaos", "-p", "no:cacheprovider", *argv]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
