"""Synthetic long-context tasks, generated on the fly (no downloads), as byte-level text.

- Pass-key retrieval in the standard form (Mohtashami & Jaggi, 2023): a fixed preamble, the same
  filler sentences repeated, one needle "The pass key is N. Remember it. N is the pass key." at a
  chosen depth, then the question.
- Multi-needle retrieval in varied prose (in the spirit of RULER's S-NIAH / MK-NIAH): several
  "The special magic number for NAME is N." needles with different names inside generated sentences,
  one of them asked for by name.

- The same two in real prose (`passkey_prose`, `multi_needle_prose`) and bAbI-style stories in prose
  (Weston et al., 2015): `babi_single` (where someone is: the last of their moves counts),
  `babi_two` (where an object is: where its carrier went after picking it up) and `babi_count`
  (how many objects someone carries after picking up and dropping some). The prose is held-out
  real text (`held_out_prose`: the corpus of `atlas corpus build`), or a short built-in passage.

Every sample's prompt has exactly the requested length in bytes (the byte tokenizer's tokens), so the
trials of one length run as one batch. The answer is what a correct model continues with.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

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
EVAL_TASKS = (*TASKS, *PROSE_TASKS)
# what training may mix
TRAIN_TASKS = (*TASKS, "passkey_any_length", "passkey_runs", "recall", "copy", "copy_block", "babi_people",
               *PROSE_TASKS)


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


def _place(head: str, body: str, needles: list[str], depths: list[float], tail: str, length: int,
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
    prompt, facts = _place(head, body, [needle], [depth], PASSKEY_QUESTION, length, gap)
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
    prompt, facts = _place(head, body, needles, depths, questions[0], length, gap)
    others = list(zip(questions[1:], [f" {v}." for v in values[1:]], strict=True))
    rng.shuffle(others)
    return Sample("multi_needle" if prose is None else "multi_needle_prose", prompt, f" {values[0]}.",
                  values[0], depths[0], follow_ups=tuple(others), facts=facts)


_SYLLABLES = ("ka", "lo", "mi", "ren", "ta", "vo", "shi", "du", "pe", "zan", "ri", "bo", "nel", "fa", "gu",
              "sol")


_MAX_MADE_UP = 3 * max(len(s) for s in _SYLLABLES)


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def recall(rng: random.Random, length: int, gap: int = 0) -> Sample:
    """Training only: the multi-needle format with as many needles as fit (up to 12) under made-up
    names, every one of them asked for; more answers per token than the evaluation tasks, and
    names the model cannot have memorised."""
    fit = max(n for n in range(2, 13) if n == 2 or _needles_room(n, _MAX_MADE_UP) <= length)
    n = rng.randint(2, fit)
    names: list[str] = []
    while len(names) < n:
        if (name := _made_up_name(rng)) not in names:
            names.append(name)
    return replace(multi_needle(rng, length, n_needles=n, names=names, gap=gap), task="recall")


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
    """ASCII only (a byte tokenizer counts bytes, `_place` counts characters: they must agree),
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


# bAbI-style stories (Weston et al., 2015, tasks 1, 2 and 7) as facts scattered through the prose.
BABI_PREAMBLE = ("A short story is hidden inside the following text. Keep track of where the people go "
                 "and what they carry. I will ask you about it afterwards.")
PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Julie", "Emily")
# at least two of each length, so that every answer has a decoy of its length (evaluation._decoy)
LOCATIONS = ("kitchen", "bedroom", "hallway", "balcony", "garden", "office", "cellar", "bathroom", "basement")
OBJECTS = ("apple", "football", "milk", "book", "hat", "key", "umbrella", "lantern")
_MOVE = ("went to", "moved to", "journeyed to", "travelled to")
_TAKE = ("picked up", "grabbed", "got")
_DROP = ("dropped", "put down", "discarded")
_BABI_MAX_COUNT = 3  # babi_count: at most this many objects picked up by the person asked about
# the most facts a story of each task has (min_length)
_BABI_FACTS = {"babi_single": 3 + 4, "babi_two": 4 + 4, "babi_count": 2 * _BABI_MAX_COUNT + 1 + 4,
               "babi_people": 4}


def _fact(rng: random.Random, who: str, verbs: tuple[str, ...], what: str) -> str:
    return f"{who} {rng.choice(verbs)} the {what}."


def _walk(rng: random.Random, n: int, start: str | None = None) -> list[str]:
    """n locations, each different from the one before (a move goes somewhere else)."""
    out: list[str] = []
    for _ in range(n):
        out.append(rng.choice([p for p in LOCATIONS if p != (out[-1] if out else start)]))
    return out


def _before(rng: random.Random, n: int, end: float, start: float = 0.0) -> list[float]:
    """n sorted depths in [start, end): the events before the asked one."""
    return sorted(start + rng.random() * (end - start) for _ in range(n))


def babi(task: str, rng: random.Random, length: int, depth: float | None = None, gap: int = 0,
         prose: str | None = None) -> Sample:
    """A bAbI-style story in prose. `depth` (uniform if None) is that of the last fact the answer
    depends on; every fact the answer depends on comes before it, the distractors (other people's
    moves, other objects picked up) anywhere. The facts keep their story order in the prompt.

    - babi_single: "Where is Mary?": 2 or 3 moves of Mary; the last counts.
    - babi_two: "Where is the apple?": its carrier picked it up, then went somewhere (once or twice;
      the last counts), perhaps after moving once before picking it up.
    - babi_count: "How many objects is Daniel carrying?": 1 to 3 objects picked up, some dropped
      again (each after its pick-up), one move that changes nothing; the answer a digit, 0 to 3."""
    depth = rng.random() if depth is None else depth
    who = rng.sample(PEOPLE, 3)
    me, others = who[0], who[1:]
    events: list[tuple[float, str]] = []  # (depth, fact)
    if task == "babi_single":
        places = _walk(rng, rng.randint(2, 3))
        for d, place in zip([*_before(rng, len(places) - 1, depth), depth], places, strict=True):
            events.append((d, _fact(rng, me, _MOVE, place)))
        question, value = f"\nWhere is {me}? {me} is in the", places[-1]
    elif task == "babi_two":
        thing, other_thing = rng.sample(OBJECTS, 2)
        picked = rng.random() * depth
        after = _walk(rng, rng.randint(1, 2))
        events.append((picked, _fact(rng, me, _TAKE, thing)))
        if rng.random() < 0.5:  # where the carrier was before taking it: the answer must not be that
            before = rng.choice([p for p in LOCATIONS if p not in after])
            events.append((rng.random() * picked, _fact(rng, me, _MOVE, before)))
        for d, place in zip([*_before(rng, len(after) - 1, depth, picked), depth], after, strict=True):
            events.append((d, _fact(rng, me, _MOVE, place)))
        events.append((rng.random(), _fact(rng, others[0], _TAKE, other_thing)))
        question, value = f"\nWhere is the {thing}? The {thing} is in the", after[-1]
    elif task == "babi_count":
        things = rng.sample(OBJECTS, _BABI_MAX_COUNT + 2)
        mine = things[:rng.randint(1, _BABI_MAX_COUNT)]
        dropped = rng.sample(mine, rng.randint(0, len(mine)))
        story: list[tuple[tuple[str, ...], str]] = [(_TAKE, t) for t in mine]
        for t in dropped:  # each drop somewhere after its pick-up
            at = story.index((_TAKE, t))
            story.insert(rng.randint(at + 1, len(story)), (_DROP, t))
        story.insert(rng.randint(0, len(story)), (_MOVE, rng.choice(LOCATIONS)))
        for d, (verbs, what) in zip([*_before(rng, len(story) - 1, depth), depth], story, strict=True):
            events.append((d, _fact(rng, me, verbs, what)))
        for other, thing in zip(others, things[_BABI_MAX_COUNT:], strict=True):
            events.append((rng.random(), _fact(rng, other, _TAKE, thing)))
        question = f"\nHow many objects is {me} carrying? {me} is carrying"
        value = str(len(mine) - len(dropped))
    else:
        raise ValueError(f"not a bAbI task: {task!r}")
    n_noise = _BABI_FACTS[task] - len(events)  # other people's moves fill the story to its size
    for other in rng.choices(others, k=rng.randint(n_noise - 1, n_noise)):
        events.append((rng.random(), _fact(rng, other, _MOVE, rng.choice(LOCATIONS))))
    events.sort(key=lambda e: e[0])
    body = prose_body(rng, held_out_prose() if prose is None else prose, length)
    prompt, facts = _place(BABI_PREAMBLE + "\n", body, [f for _, f in events], [d for d, _ in events],
                           question, length, gap, ordered=True)
    return Sample(task, prompt, f" {value}.", value, depth, facts=facts)


def babi_people(rng: random.Random, length: int, gap: int = 0, prose: str | None = None) -> Sample:
    """Training only, the first step towards babi_single: two to four people each go to one place
    (all different), and every one of them is asked where they are. Only the name tells the answers
    apart, so the memory must be read by the person's name, not by the words before the place
    ("Mary is in the" after "Mary went to the kitchen.")."""
    who = rng.sample(PEOPLE, rng.randint(2, _BABI_FACTS["babi_people"]))
    places = rng.sample(LOCATIONS, len(who))
    facts = [_fact(rng, w, _MOVE, p) for w, p in zip(who, places, strict=True)]
    depths = [rng.random() for _ in who]
    questions = [f"\nWhere is {w}? {w} is in the" for w in who]
    body = prose_body(rng, held_out_prose() if prose is None else prose, length)
    prompt, spans = _place(BABI_PREAMBLE + "\n", body, facts, depths, questions[0], length, gap)
    others = list(zip(questions[1:], [f" {p}." for p in places[1:]], strict=True))
    return Sample("babi_people", prompt, f" {places[0]}.", places[0], depths[0], follow_ups=tuple(others),
                  facts=spans)


def _babi_room(task: str) -> int:
    """Bytes of a bAbI prompt without prose, for the longest names and words."""
    word, verb = max(LOCATIONS + OBJECTS, key=len), max(_MOVE + _TAKE + _DROP, key=len)
    who, thing = max(PEOPLE, key=len), max(OBJECTS, key=len)
    fact = len(f"{who} {verb} the {word}.") + 1
    question = max(len(f"\nWhere is the {thing}? The {thing} is in the"),
                   len(f"\nWhere is {who}? {who} is in the"),
                   len(f"\nHow many objects is {who} carrying? {who} is carrying"))
    return len(BABI_PREAMBLE) + 1 + _BABI_FACTS[task] * fact + question


def make_sample(task: str, rng: random.Random, length: int, depth: float | None = None,
                gap: int = 0, key_digits: int = KEY_DIGITS, prose: str | None = None) -> Sample:
    """One prompt of `length` bytes. `gap` (training): at least that many bytes of filler follow each
    needle, e.g. the attention window, so that only the memory can answer. `key_digits`: the longest
    key of passkey_any_length and passkey_runs. `prose`: the text of PROSE_TASKS (`held_out_prose`;
    default its built-in fallback)."""
    if task == "babi_people":
        return babi_people(rng, length, gap, prose)
    if task in PROSE_TASKS:
        prose = held_out_prose() if prose is None else prose
        if task == "passkey_prose":
            return passkey(rng, length, depth, gap, prose=prose)
        if task == "multi_needle_prose":
            return multi_needle(rng, length, depth=depth, gap=gap, prose=prose)
        return babi(task, rng, length, depth, gap, prose)
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
        return _babi_room(task)
    if task in ("passkey", "passkey_any_length", "passkey_runs", "passkey_prose"):
        key = "5" * (5 if task in ("passkey", "passkey_prose") else key_digits)
        return len(PASSKEY_PREAMBLE) + 1 + len(PASSKEY_QUESTION) + len(f"The pass key is {key}. Remember it. "
                                                                        f"{key} is the pass key.") + 1
    if task == "recall":
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
