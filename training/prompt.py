"""What every task's prompt is made of: the `Sample`, the placement of facts in a body of text
(`place_facts`), and the real prose that the real-text tasks hide their facts in."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str  # exactly `length` bytes
    answer: str  # the continuation a correct model produces, e.g. " 31415."
    value: str  # the number asked for
    depth: float  # relative position of the (asked) needle in the prompt
    # For training: more (question, answer) pairs about the same prompt, asked after the answer,
    # and spans of the prompt that repeat something a few tokens earlier (the key's second mention).
    follow_ups: tuple[tuple[str, str], ...] = ()
    copies: tuple[tuple[int, int], ...] = ()
    # For training: the spans of the prompt that hold its facts (needles, a story's sentences);
    # None where the task does not say (then no chunk of it counts as fact-free).
    facts: tuple[tuple[int, int], ...] | None = None


def place_facts(head: str, body: str, needles: list[str], depths: list[float], tail: str, length: int,
           gap: int = 0, ordered: bool = False) -> tuple[str, tuple[tuple[int, int], ...]]:
    """head + body (cut to fit) with each needle inserted at its relative depth of the body + tail,
    exactly `length` bytes, and the needles' spans in it; needles go in at sentence boundaries,
    followed by at least `gap` bytes of the body (as many as there are, if the body is shorter).
    `ordered`: needles that land on the same boundary keep the order given (a story's events),
    instead of sorting by text."""
    room = length - len(head) - len(tail) - sum(len(n) + 1 for n in needles)
    if room < 0:
        raise ValueError(f"length {length} is too short for this task (needs {length - room})")
    body = body[:room]
    cuts = []
    for depth in depths:
        at = int(depth * max(0, room - gap))
        stop = body.rfind(". ", 0, at + 1)
        cuts.append(0 if stop < 0 else stop + 2)
    out, prev, size, spans = [head], 0, len(head), []
    placed = zip(cuts, needles, strict=True)
    # the default order (ties by text) stays as it was, so that earlier prompts are reproduced
    for at, needle in (sorted(placed, key=lambda c: c[0]) if ordered else sorted(placed)):
        out += [body[prev:at], needle, " "]
        size += at - prev
        spans.append((size, size + len(needle)))
        size += len(needle) + 1
        prev = at
    out += [body[prev:], tail]
    text = "".join(out)
    assert len(text) == length, (len(text), length)
    return text, tuple(spans)


# Real prose (issue 30). The fallback keeps tests and a fresh clone working without the corpus; it
# is short, so its prompts repeat it, and results measured on it say so (`atlas eval --prose`).
FALLBACK_PROSE = """\
The road out of the valley climbs through a forest of beech and oak before it reaches the pass. In
spring the stream beside it runs high and loud, and travellers have to wait at the ford until the
water falls in the afternoon. Nobody remembers who first built the stone hut at the top, but every
generation has repaired its roof, and the shepherds still leave dry wood inside for whoever comes
next. From the doorway one can see three villages, a lake the colour of slate and, on clear days,
the white line of the coast far to the west.
The library in the old customs house opened its doors to the public only after the war. Its first
keeper catalogued the books by the colour of their bindings, a system that survived for eleven years
because the readers had learned it by heart. When the council finally paid for proper shelves, the
new catalogue took a whole winter to write, and several volumes were found to be missing, among them
an atlas that had been lent to a sea captain and never returned.
Bread was baked twice a day in the square. The baker rose long before dawn, lit the oven with the
shavings from the carpenter next door and set the first loaves to rise while the streets were still
dark. By seven there was a queue, and by nine the shelves were empty again. In the afternoon he baked
smaller rolls for the school, and on feast days a sweet loaf with raisins that children were sent to
fetch in baskets lined with cloth.
The engineers argued for months about the bridge. One party wanted a single arch of iron that would
let the barges pass without lowering their masts; the other wanted three arches of stone that would
cost less and, they said, stand for five hundred years. In the end the stone was chosen, the barges
were given shorter masts, and the old ferryman, who had carried people across for forty years, was
offered the job of keeping the toll.
A letter can take a surprising route. Posted in the capital on a Monday, it may travel by train to
the coast, wait a night in a sorting office, cross the water on the morning boat and then ride in the
saddlebag of a postman who walks the last miles because the lane is too narrow for a van. When it
arrives, a little creased, the reader rarely thinks of any of this; they only notice that the stamp
shows a lighthouse and that the handwriting on the envelope has changed since the last time.
"""


def normalize_prose(text: str) -> str:
    """ASCII only (a byte tokenizer counts bytes, `place_facts` counts characters: they must agree),
    whitespace collapsed to single spaces, so that sentences end in ". " where needles can go."""
    return " ".join(text.encode("ascii", "ignore").decode().split())


@lru_cache(maxsize=4)
def held_out_prose(source: str | Path | None = None) -> str:
    """The prose the real-text tasks hide their facts in: `source` a corpus folder (its
    eval-prose.txt, see `atlas corpus build`) or a text file; None: the built-in FALLBACK_PROSE."""
    if source is None:
        return normalize_prose(FALLBACK_PROSE)
    path = Path(source)
    text = normalize_prose((path / "eval-prose.txt" if path.is_dir() else path).read_text(encoding="utf-8"))
    if len(text) < 1024:
        raise ValueError(f"{source}: too little prose ({len(text)} bytes) for the real-text tasks")
    return text


def prose_body(rng: random.Random, prose: str, n_bytes: int) -> str:
    """n_bytes of `prose` from a random sentence start on, wrapping around to its beginning."""
    start = prose.find(". ", rng.randrange(len(prose)))
    text = prose[start + 2:] if start >= 0 else prose
    reps = max(0, n_bytes - len(text)) // (len(prose) + 1) + 1
    return " ".join([text, *[prose] * reps])[:n_bytes]
