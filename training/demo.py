"""What `atlas demo` and the playground's demo show: a long document of real prose with facts hidden
in it (a pass key, four named numbers, a bAbI-style story), the questions about them with their true
answers, and a model's greedy answers to set beside the truth and beside the attention-only
baseline's.

A document is a task's prompt (training/tasks.py) without its question: the same text `atlas eval`
measures, so what the demo shows is what the evaluation counts. It is a function of (task, length,
seed, prose) only, so the server can build it again instead of keeping it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atlas.engine.sampling import SamplingParams

from .prompt import held_out_prose
from .tasks import first_answer, make_sample, min_length

if TYPE_CHECKING:
    from atlas.engine import Atlas
    from atlas.engine.state import SessionState

#: What a demo can hide, the first the default: facts in real prose, then the synthetic filler.
DEMO_TASKS = ("passkey_prose", "multi_needle_prose", "babi_single", "babi_two", "babi_count", "passkey",
              "multi_needle")
#: The attention-only baseline of the bundled model (configs/train/swa-baseline-prose.toml).
BASELINE_CHECKPOINT = Path(__file__).resolve().parent.parent / "engine" / "assets" / "demo-baseline"
MAX_ANSWER_TOKENS = 16  # every true answer is a few bytes (" 1234567."); the rest is never read
MAX_DEMO_BYTES = 64 << 20  # 64 MB of text: millions of tokens, still one string in memory


@dataclass(frozen=True)
class Fact:
    question: str  # asked right after the document, e.g. "\nWhere is Mary? Mary is in the"
    truth: str  # the value a right answer starts with, e.g. "kitchen" or "31415"


@dataclass(frozen=True)
class DemoDocument:
    task: str
    seed: int
    document: str
    facts: tuple[Fact, ...]


def shortest(task: str) -> int:
    """The fewest bytes a demo document of `task` can have (its facts and no prose)."""
    return min_length(task)


def demo_document(task: str, n_bytes: int, seed: int = 0, prose: str | None = None) -> DemoDocument:
    """A document of about `n_bytes` bytes (exactly, less its first question) of `prose` (default:
    the built-in passage; see prompt.held_out_prose) with the task's facts at random depths."""
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}; one of {', '.join(DEMO_TASKS)}")
    if not shortest(task) <= n_bytes <= MAX_DEMO_BYTES:
        raise ValueError(f"a {task} document has {shortest(task)} to {MAX_DEMO_BYTES} bytes, not {n_bytes}")
    sample = make_sample(task, random.Random(seed), n_bytes,
                         prose=held_out_prose() if prose is None else prose)
    cut = sample.prompt.rindex("\n")  # every question starts a line; prose and preamble have none after
    first = Fact(sample.prompt[cut:], sample.value)
    others = [Fact(q, a.strip().rstrip(".")) for q, a in sample.follow_ups]
    return DemoDocument(task, seed, sample.prompt[:cut], (first, *others))


def answer_params() -> SamplingParams:
    """Greedy, a few tokens, stopping at the end of the value's sentence or line."""
    return SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, stop=[".", "\n"])


def is_right(fact: Fact, text: str) -> bool:
    """Whether a model's answer gives the fact's value (its first number, or first word for places)."""
    return first_answer(text, fact.truth) == fact.truth


def ask_all(atlas: Atlas, state: SessionState, facts: tuple[Fact, ...]) -> list[str]:
    """The greedy answer of `atlas` to each fact's question, each asked of its own copy of `state`
    (the session after the document)."""
    answers = []
    for fact in facts:
        gen = atlas.generate(state, fact.question, answer_params())  # a copy: state stays as it is
        for _ in gen:
            pass
        answers.append(gen.text)
    return answers


def read_document(atlas: Atlas, text: str, on_progress: Callable[[int, int], None] | None = None,
                  piece_tokens: int = 16 * 1024) -> SessionState:
    """A new session of `atlas` after reading `text`, piece by piece; on_progress(done, total) in
    tokens after each piece."""
    ids = atlas.encode(text)
    state = atlas.new_state()
    for i in range(0, len(ids), piece_tokens):
        state, _ = atlas.feed(state, ids[i:i + piece_tokens])
        if on_progress is not None:
            on_progress(min(len(ids), i + piece_tokens), len(ids))
    return state
