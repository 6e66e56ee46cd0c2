"""Fixtures of the chaos suite, and the table printed (and saved) at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.engine import Atlas

from . import table


@pytest.fixture(scope="module")
def fast_model(fast_checkpoint: Path) -> Atlas:
    """The served model, loaded here too: to build damaged states and to compare stored ones."""
    return Atlas.load(fast_checkpoint)


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
