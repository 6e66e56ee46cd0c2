"""The image tests' timings, printed after the run (they are the point of `make test-image`)."""

from __future__ import annotations

import pytest

from . import timings


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not timings.TIMINGS:
        return
    terminalreporter.write_sep("=", "container image: timings")
    for line in timings.render():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"saved {timings.save().relative_to(timings.ARTIFACT.parents[1])}")
