"""The chaos suite's tally: per fault class, what was injected, what was asked, and what went wrong.

Every test of tests/chaos adds to one `ClassCounts` (keyed by class and by the suite's size, short or
full); the conftest prints the table at the end of the run and, when ``ATLAS_CHAOS_JSON`` names a
file (``python -m tests.chaos`` sets it), saves it there as JSON with the machine described.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from atlas.engine.machine import load_average

#: What each column means; printed under the table and saved with it.
LEGEND: dict[str, str] = {
    "faults": "faults injected (a kill, a freeze, a damaged state or field, a race of concurrent clients)",
    "requests": "HTTP requests made to the server during the class (readiness polls not counted)",
    "lost_bytes": "document bytes acknowledged as committed (bytes_committed of GET /v1/sessions/{id} or "
                  "of a done event) before a fault that a later read no longer has",
    "wrong": "answers that differ from an uninterrupted reference run (stored state bytes, else the "
             "recurrent tensors bit for bit and the greedy continuation), any answer served from a "
             "damaged or forged state, or (class 5) any moment with more sessions than the cap",
    "5xx": "unexpected 5xx answers: 500 internal_error and any 5xx other than 503 store_unavailable",
    "503_unavailable": "503 store_unavailable while Redis was down or frozen: expected, counted apart",
    "max_wait_s": "longest wait to recover, in seconds: from the restart until the resume was accepted "
                  "(the dead writer's lease; classes 1, 2), from the end of the fault until the store "
                  "answered again (6) or from the kill until it answered again (7)",
    "lease_409": "409 lease_conflict answers met by a resume (the dead writer's lease not yet taken over)",
    "max_answer_s": "longest time any one request took to answer, in seconds (class 6: during the faults)",
    "seconds": "wall time of the class",
}


@dataclass
class ClassCounts:
    name: str
    size: str  # "short" or "full"
    faults: int = 0
    requests: int = 0
    lost_bytes: int = 0
    wrong: int = 0
    errors_5xx: int = 0
    unavailable_503: int = 0
    max_wait_s: float = 0.0
    max_answer_s: float = 0.0
    lease_409: int = 0
    seconds: float = 0.0
    #: A few remarks: where the faults fell, and anything unexpected (the first of each kind).
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Thread-safe increments (clients run in threads)."""
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.max_wait_s = max(self.max_wait_s, seconds)

    def answered(self, seconds: float) -> None:
        with self._lock:
            self.max_answer_s = max(self.max_answer_s, seconds)

    def note(self, line: str) -> None:
        with self._lock:
            if len(self.notes) < 20 and line not in self.notes:
                self.notes.append(line)

    def row(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["notes"] = list(self.notes)
        d["max_wait_s"] = round(self.max_wait_s, 2)
        d["max_answer_s"] = round(self.max_answer_s, 2)
        d["seconds"] = round(self.seconds, 1)
        return d


_TABLE: dict[tuple[str, str], ClassCounts] = {}
#: The machine's load when the first class began (before any fault), for the saved record.
_LOAD_AT_START: list[float] | None = None
_STARTED: dict[tuple[str, str], float] = {}


def counts(name: str, size: str) -> ClassCounts:
    """The counters of one class at one size, created on first use (its clock starts then)."""
    key = (name, size)
    if key not in _TABLE:
        global _LOAD_AT_START
        if _LOAD_AT_START is None:
            _LOAD_AT_START = load_average()
        _TABLE[key] = ClassCounts(name, size)
        _STARTED[key] = time.monotonic()
    return _TABLE[key]


def finish(c: ClassCounts) -> None:
    c.seconds = time.monotonic() - _STARTED[(c.name, c.size)]


def rows() -> list[dict[str, Any]]:
    return [_TABLE[k].row() for k in sorted(_TABLE)]


COLUMNS = [("class", "name", "<"), ("size", "size", "<"), ("faults", "faults", ">"),
           ("requests", "requests", ">"), ("lost bytes", "lost_bytes", ">"), ("wrong", "wrong", ">"),
           ("5xx", "errors_5xx", ">"), ("503 unavail.", "unavailable_503", ">"),
           ("409 lease", "lease_409", ">"), ("max wait s", "max_wait_s", ">"),
           ("max answer s", "max_answer_s", ">"),
           ("seconds", "seconds", ">")]


def render(markdown: bool = False) -> str:
    """The table as plain text (terminal) or Markdown (docs/chaos.md)."""
    data = rows()
    # Only class 6 times single answers; elsewhere the column says "not measured", not zero.
    cells = [["-" if key == "max_answer_s" and not r[key] else str(r[key]) for _, key, _ in COLUMNS]
             for r in data]
    if markdown:
        head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
        rule = "|" + "|".join("---:" if a == ">" else "---" for _, _, a in COLUMNS) + "|"
        return "\n".join([head, rule, *("| " + " | ".join(c) + " |" for c in cells)])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
    fmt = lambda vals: "  ".join(f"{v:{a}{w}}" for v, w, (_, _, a) in zip(vals, widths, COLUMNS, strict=True))  # noqa: E731
    lines = [fmt([h for h, _, _ in COLUMNS]), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)]
    notes = [f"  {r['name']} ({r['size']}): {n}" for r in data for n in r["notes"]]
    return "\n".join(lines + (["remarks:", *notes] if notes else []))


def save(path: Path) -> None:
    """The table as JSON with the machine described (paths portable: the file is committed)."""
    from atlas.engine.machine import describe_machine

    record = {"benchmark": "chaos", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {**describe_machine("cpu"), "load_average_at_start": _LOAD_AT_START,
                          "load_average_at_end": load_average(),
                          "note": "server, Redis and clients share this machine (loopback)"},
              "command": "python -m tests.chaos", "legend": LEGEND, "classes": rows()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def json_target() -> Path | None:
    target = os.environ.get("ATLAS_CHAOS_JSON")
    return Path(target) if target else None
