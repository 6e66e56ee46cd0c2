"""Fixtures of the chaos suite, and the table printed (and saved) at the end of the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atlas.engine import Atlas

from . import table


@pytest.fixture(scope="module")
def fast_model(fast_checkpoint: Path) -> Atlas:
    """The served model, loaded here too: to build damaged states and to compare stored ones."""
    return Atlas.load(fast_checkpoint)


#: Set by `python -m tests.chaos`: the full classes (minutes) run only then, not in `make test`,
#: which runs each class's short version.
FULL = "ATLAS_CHAOS_FULL"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(FULL) == "1":
        return
    skip = pytest.mark.skip(reason="the full chaos class (minutes): run `python -m tests.chaos`")
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("slow") and here in Path(item.fspath).parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not table.rows():
        return
    terminalreporter.write_sep("=", "chaos: faults injected and what they did")
    terminalreporter.write_line(table.render())
    for key, text in table.LEGEND.items():
        terminalreporter.write_line(f"  {key}: {text}")
    target = table.json_target()
    if target is not None and any(r["size"] == "full" for r in table.rows()):
        table.save(target)
        terminalreporter.write_line(f"saved {target}")
