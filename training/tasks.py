"""Synthetic long-context tasks, generated on the fly (no downloads), as byte-level text.

- Pass-key retrieval in the standard form (Mohtashami & Jaggi, 2023): a fixed preamble, the same
  filler sentences repeated, one needle "The pass key is N. Remember it. N is the pass key." at a
  chosen depth, then the question.
- Multi-needle retrieval in varied prose (in the spirit of RULER's S-NIAH / MK-NIAH): several
  "The special magic number for NAME is N." needles with different names inside generated sentences,
  one of them asked for by name.

- The same two in real prose (`passkey_prose`, `multi_needle_prose`) and bAbI-style stories in prose
  (training/babi.py). The prose is held-out real text (`prompt.held_out_prose`: the corpus of
  `atlas corpus build`), or a short built-in passage.

Every sample's prompt has exactly the requested length in bytes (the byte tokenizer's tokens), so the
trials of one length run as one batch. The answer is what a correct model continues with.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from .babi import babi, babi_moves, babi_people, babi_room
from .prompt import Sample, held_out_prose, place_facts, prose_body

PASSKEY_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NEEDLES_PREAMBLE = ("Some special magic numbers are hidden inside the following text. "
                    "Make sure to memorize them. I will quiz you about the numbers afterwards.")

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kwame", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar",
         "Umar", "Vera", "Wanda", "Xavier", "Yusuf", "Zoe")
_ADJ = ("quiet", "old", "bright", "narrow", "green", "heavy", "small", "distant", "warm", "broken",
        "silver", "patient", "early", "wooden", "busy", "gentle")
_NOUN = ("river", "village", "teacher", "garden", "window", "market", "bridge", "letter", "mountain",
         "kitchen", "painter", "harbor", "library", "orchard", "engine", "lantern")
_VERB = ("watched", "crossed", "painted", "carried", "found", "opened", "followed", "repaired",
         "remembered", "visited", "described", "passed")
_PLACE = ("before noon", "in the rain", "after the festival", "near the station", "every morning",
          "at the edge of town", "during the winter", "without a word")

TASKS = ("passkey", "multi_needle")  # what `atlas eval` measures unless told
# the tasks in real prose (issue 30), which `atlas eval --tasks` also runs
PROSE_TASKS = ("passkey_prose", "multi_needle_prose", "babi_single", "babi_two", "babi_count")
# the bAbI curriculum's steps towards babi_single, trained on and also run by `atlas eval --tasks` on
# their first question (the model card's figures for the candidates that trained on them)
BABI_STEP_TASKS = ("babi_people", "babi_echo", "babi_moves", "babi_recall", "babi_where", "babi_rooms")
EVAL_TASKS = (*TASKS, *PROSE_TASKS, *BABI_STEP_TASKS)
# what training draws from real prose besides PROSE_TASKS
_PROSE_TRAIN_TASKS = (*BABI_STEP_TASKS, "recall_prose")
# what training may mix
TRAIN_TASKS = (*TASKS, "passkey_any_length", "passkey_runs", "recall", "copy", "copy_block",
               *_PROSE_TRAIN_TASKS, *PROSE_TASKS)


def _prose(rng: random.Random, n_bytes: int) -> str:
    """At least n_bytes of varied generated sentences."""
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        s = (f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} "
             f"{rng.choice(_NOUN)} {rng.choice(_PLACE)}.")
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)


def _filler(n_bytes: int) -> str:
    reps = n_bytes // (len(PASSKEY_FILLER) + 1) + 1
    return " ".join([PASSKEY_FILLER] * reps)


def passkey(rng: random.Random, length: int, depth: float | None = None, gap: int = 0,
            digits: int | None = None, key: str | None = None, prose: str | None = None) -> Sample:
    """Pass-key retrieval with a random key in [1, 50000] (or of `digits` digits, or `key`) at
    `depth` (uniform if None) of the filler, followed by at least `gap` bytes of it. `prose`: the
    filler is this text instead (from a random place in it; `prose_body`): task passkey_prose."""
    if key is None:
        low, high = (1, 50000) if digits is None else (10 ** (digits - 1), 10 ** digits - 1)
        key = str(rng.randint(low, high))
    depth = rng.random() if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = PASSKEY_PREAMBLE + "\n"
    body = _filler(length) if prose is None else prose_body(rng, prose, length)
    prompt, facts = place_facts(head, body, [needle], [depth], PASSKEY_QUESTION, length, gap)
    second = facts[0][0] + needle.index(f" {key} is") + 1
    return Sample("passkey" if prose is None else "passkey_prose", prompt, f" {key}.", key, depth,
                  copies=((second, second + len(key)),), facts=facts)


KEY_DIGITS = 7  # the longest key of passkey_any_length and passkey_runs, unless told


def passkey_any_length(rng: random.Random, length: int, gap: int = 0, key_digits: int = KEY_DIGITS
                       ) -> Sample:
    """Training only: the pass-key task with keys of 1 to `key_digits` digits, each length as likely.
    Most standard keys have five digits, so a model can learn to stop after five from habit, and then
    adds a digit to a four-digit key it recalls; here only the memory says where the key ends."""
    sample = passkey(rng, length, gap=gap, digits=rng.randint(1, key_digits))
    return replace(sample, task="passkey_any_length")


def _key_with_runs(rng: random.Random, key_digits: int = KEY_DIGITS) -> str:
    """1 to key_digits digits; each digit after the first repeats the one before it with probability 1/2."""
    key = [rng.choice("123456789")]
    for _ in range(rng.randint(1, key_digits) - 1):
        key.append(key[-1] if rng.random() < 0.5 else rng.choice([d for d in "0123456789" if d != key[-1]]))
    return "".join(key)


def passkey_runs(rng: random.Random, length: int, gap: int = 0, key_digits: int = KEY_DIGITS) -> Sample:
    """Training only: the pass-key task with keys of 1 to `key_digits` digits that often repeat a digit
    (80044, 99011, 5555). After a repeated digit the recent bytes look the same whether the key
    goes on, repeats again or ends; only the memory knows how many times the digit came, and random
    keys ask this rarely, so a model recalls them but miscounts their runs far away."""
    return replace(passkey(rng, length, gap=gap, key=_key_with_runs(rng, key_digits)), task="passkey_runs")


def multi_needle(rng: random.Random, length: int, n_needles: int = 4, depth: float | None = None,
                 names: list[str] | None = None, gap: int = 0, prose: str | None = None) -> Sample:
    """`n_needles` 7-digit magic numbers for different names in generated prose; one is asked for.
    The asked needle sits at `depth` (uniform if None); the others at uniform depths; at least `gap`
    bytes of prose follow each. `prose`: in this real text instead (task multi_needle_prose)."""
    names = names or rng.sample(NAMES, n_needles)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in names]
    depths = [rng.random() for _ in names]
    if depth is not None:
        depths[0] = depth
    needles = [f"The special magic number for {n} is {v}." for n, v in zip(names, values, strict=True)]
    head = NEEDLES_PREAMBLE + "\n"
    ask = "\nWhat is the special magic number for {0}? The special magic number for {0} is"
    questions = [ask.format(n) for n in names]
    body = _prose(rng, length) if prose is None else prose_body(rng, prose, length)
    prompt, facts = place_facts(head, body, needles, depths, questions[0], length, gap)
    others = list(zip(questions[1:], [f" {v}." for v in values[1:]], strict=True))
    rng.shuffle(others)
    return Sample("multi_needle" if prose is None else "multi_needle_prose", prompt, f" {values[0]}.",
                  values[0], depths[0], follow_ups=tuple(others), facts=facts)


_SYLLABLES = ("ka", "lo", "mi", "ren", "ta", "vo", "shi", "du", "pe", "zan", "ri", "bo", "nel", "fa", "gu",
              "sol")


_MAX_MADE_UP = 3 * max(len(s) for s in _SYLLABLES)


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _made_up_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        if (name := _made_up_name(rng)) not in names:
            names.append(name)
    return names


def recall(rng: random.Random, length: int, gap: int = 0, prose: str | None = None) -> Sample:
    """Training only: the multi-needle format with as many needles as fit (up to 12) under made-up
    names, every one of them asked for; more answers per token than the evaluation tasks, and
    names the model cannot have memorised. `prose`: in this real text (task recall_prose)."""
    fit = max(n for n in range(2, 13) if n == 2 or _needles_room(n, _MAX_MADE_UP) <= length)
    names = _made_up_names(rng, rng.randint(2, fit))
    sample = multi_needle(rng, length, n_needles=len(names), names=names, gap=gap, prose=prose)
    return replace(sample, task="recall" if prose is None else "recall_prose")


def copy(rng: random.Random, length: int) -> Sample:
    """Training only: random strings (mostly digits), each written twice, "R\nR\n", back to back; the
    second copies are scored. Dense practice for copying what was seen before (induction), which
    every retrieval task needs and which the sparse answers of the others teach slowly."""
    parts: list[str] = []
    copies: list[tuple[int, int]] = []
    size = 0
    while True:
        alphabet = "0123456789" if rng.random() < 0.7 else "abcdefghijklmnopqrstuvwxyz0123456789"
        r = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 32)))
        if size + 2 * (len(r) + 1) > length:
            break
        copies.append((size + len(r) + 1, size + 2 * len(r) + 1))
        parts += [r, "\n", r, "\n"]
        size += 2 * (len(r) + 1)
    prompt = "".join(parts)
    prompt += "\n" * (length - len(prompt))  # the blocks fill all but a few bytes
    return Sample("copy", prompt, "", "", 1.0, copies=tuple(copies))  # all is in the copies


def copy_block(rng: random.Random, length: int, gap: int = 0) -> Sample:
    """Training only: a block of random strings (mostly digits, one per line) and then the same block
    again, repeated with new blocks to fill the prompt; the second writing of each block is scored
    but for its first byte. A block holds more than `gap` bytes (at least 64, at most about four times
    that; less where the prompt is too short for two), so with the attention window as the gap only
    the memory can recall it: dense practice at what the pass key needs."""
    parts: list[str] = []
    copies: list[tuple[int, int]] = []
    size = 0
    lo = min(max(64, gap + 1), (length - 32) // 2)  # one block always fits
    while True:
        target = rng.randint(lo, max(lo, min(4 * lo, (length - size) // 2)))
        block = ""
        while len(block) < target:
            alphabet = "0123456789" if rng.random() < 0.7 else "abcdefghijklmnopqrstuvwxyz0123456789"
            block += "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 16))) + "\n"
        if size + 2 * len(block) > length:
            break
        copies.append((size + len(block) + 1, size + 2 * len(block)))
        parts += [block, block]
        size += 2 * len(block)
    prompt = "".join(parts)
    prompt += "\n" * (length - len(prompt))
    return Sample("copy_block", prompt, "", "", 1.0, copies=tuple(copies))

def make_sample(task: str, rng: random.Random, length: int, depth: float | None = None,
                gap: int = 0, key_digits: int = KEY_DIGITS, prose: str | None = None) -> Sample:
    """One prompt of `length` bytes. `gap` (training): at least that many bytes of filler follow each
    needle, e.g. the attention window, so that only the memory can answer. `key_digits`: the longest
    key of passkey_any_length and passkey_runs. `prose`: the text of PROSE_TASKS (`held_out_prose`;
    default its built-in fallback)."""
    if task in (*PROSE_TASKS, *_PROSE_TRAIN_TASKS):
        text = held_out_prose() if prose is None else prose
        if task in ("babi_people", "babi_echo"):
            return babi_people(rng, length, text, gap, echo=task == "babi_echo")
        if task == "babi_moves":
            return babi_moves(rng, length, text, gap)
        if task == "babi_where":
            return babi_moves(rng, length, text, gap, worded_as_asked=True)
        if task == "babi_rooms":
            return babi_moves(rng, length, text, gap, numbered=True)
        if task == "babi_recall":
            return babi_moves(rng, length, text, gap, names=_made_up_names(rng, rng.randint(2, 4)))
        if task == "recall_prose":
            return recall(rng, length, gap, text)
        if task == "passkey_prose":
            return passkey(rng, length, depth, gap, prose=text)
        if task == "multi_needle_prose":
            return multi_needle(rng, length, depth=depth, gap=gap, prose=text)
        return babi(task, rng, length, text, depth, gap)
    if task == "passkey":
        return passkey(rng, length, depth, gap)
    if task == "multi_needle":
        return multi_needle(rng, length, depth=depth, gap=gap)
    if task == "passkey_any_length":
        return passkey_any_length(rng, length, gap, key_digits)
    if task == "passkey_runs":
        return passkey_runs(rng, length, gap, key_digits)
    if task == "recall":
        return recall(rng, length, gap)
    if task == "copy":
        return copy(rng, length)
    if task == "copy_block":
        return copy_block(rng, length, gap)
    raise ValueError(f"unknown task {task!r}; one of {TRAIN_TASKS}")


def _needles_room(n_needles: int, name_len: int) -> int:
    """Bytes of the multi-needle format without prose: preamble, n needles, the question."""
    name = "x" * name_len
    needle = len(f"The special magic number for {name} is 1234567.") + 1
    question = len(f"\nWhat is the special magic number for {name}? The special magic number for {name} is")
    return len(NEEDLES_PREAMBLE) + 1 + n_needles * needle + question


def min_length(task: str, key_digits: int = KEY_DIGITS) -> int:
    """The shortest prompt a task fits in (no filler at all), with room for the longest key."""
    if task.startswith("babi_"):
        return babi_room(task, _MAX_MADE_UP if task == "babi_recall" else None)
    if task in ("passkey", "passkey_any_length", "passkey_runs", "passkey_prose"):
        key = "5" * (5 if task in ("passkey", "passkey_prose") else key_digits)
        return len(PASSKEY_PREAMBLE) + 1 + len(PASSKEY_QUESTION) + len(f"The pass key is {key}. Remember it. "
                                                                        f"{key} is the pass key.") + 1
    if task in ("recall", "recall_prose"):
        return _needles_room(2, _MAX_MADE_UP)
    if task == "copy":
        return 10
    if task == "copy_block":
        return 256
    return _needles_room(4, max(len(n) for n in NAMES))


def first_number(text: str) -> str | None:
    """The first integer in a model's answer, to compare with the sample's value."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def first_answer(text: str, value: str) -> str | None:
    """The model's answer of the value's kind: its first integer for a number, else its first word
    (the bAbI places)."""
    if value.isdigit():
        return first_number(text)
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0) if m else None
