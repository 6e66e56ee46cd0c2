"""bAbI-style stories (Weston et al., 2015, tasks 1, 2 and 7) as facts scattered through prose:
`babi_single` (where someone is: the last of their moves counts), `babi_two` (where an object is:
where its carrier went after picking it up), `babi_count` (how many objects someone carries after
picking up and dropping some), and the training steps towards the first, `babi_people` and
`babi_moves`, and `babi_recall` (babi_moves under made-up names), `babi_where` and `babi_rooms`
(babi_moves worded as asked, or with numbered rooms for places)."""

from __future__ import annotations

import random

from .prompt import Sample, place_facts, prose_body

BABI_PREAMBLE = ("A short story is hidden inside the following text. Keep track of where the people go "
                 "and what they carry. I will ask you about it afterwards.")
PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Julie", "Emily")
# at least two of each length, so that every answer has a decoy of its length (evaluation._decoy)
LOCATIONS = ("kitchen", "bedroom", "hallway", "balcony", "garden", "office", "cellar", "bathroom", "basement")
OBJECTS = ("apple", "football", "milk", "book", "hat", "key", "umbrella", "lantern")
_MOVE = ("went to", "moved to", "journeyed to", "travelled to")
_TAKE = ("picked up", "grabbed", "got")
_DROP = ("dropped", "put down", "discarded")
BABI_MAX_COUNT = 3  # babi_count: at most this many objects picked up by the person asked about
# the most facts a story of each task has (min_length)
_BABI_FACTS = {"babi_single": 3 + 4, "babi_two": 4 + 4, "babi_count": 2 * BABI_MAX_COUNT + 1 + 4,
               "babi_people": 4, "babi_echo": 4, "babi_moves": 3 * 3, "babi_recall": 4 * 3,
               "babi_where": 3 * 3, "babi_rooms": 3 * 3}
ROOM_DIGITS = 4  # babi_rooms: "Mary went to room 4821."


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


def babi(task: str, rng: random.Random, length: int, prose: str, depth: float | None = None,
         gap: int = 0) -> Sample:
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
        things = rng.sample(OBJECTS, BABI_MAX_COUNT + 2)
        mine = things[:rng.randint(1, BABI_MAX_COUNT)]
        dropped = rng.sample(mine, rng.randint(0, len(mine)))
        story: list[tuple[tuple[str, ...], str]] = [(_TAKE, t) for t in mine]
        for t in dropped:  # each drop somewhere after its pick-up
            at = story.index((_TAKE, t))
            story.insert(rng.randint(at + 1, len(story)), (_DROP, t))
        story.insert(rng.randint(0, len(story)), (_MOVE, rng.choice(LOCATIONS)))
        for d, (verbs, what) in zip([*_before(rng, len(story) - 1, depth), depth], story, strict=True):
            events.append((d, _fact(rng, me, verbs, what)))
        for other, thing in zip(others, things[BABI_MAX_COUNT:], strict=True):
            events.append((rng.random(), _fact(rng, other, _TAKE, thing)))
        question = f"\nHow many objects is {me} carrying? {me} is carrying"
        value = str(len(mine) - len(dropped))
    else:
        raise ValueError(f"not a bAbI task: {task!r}")
    n_noise = _BABI_FACTS[task] - len(events)  # other people's moves fill the story to its size
    for other in rng.choices(others, k=rng.randint(n_noise - 1, n_noise)):
        events.append((rng.random(), _fact(rng, other, _MOVE, rng.choice(LOCATIONS))))
    events.sort(key=lambda e: e[0])
    body = prose_body(rng, prose, length)
    prompt, facts = place_facts(BABI_PREAMBLE + "\n", body, [f for _, f in events], [d for d, _ in events],
                           question, length, gap, ordered=True)
    return Sample(task, prompt, f" {value}.", value, depth, facts=facts)


def babi_people(rng: random.Random, length: int, prose: str, gap: int = 0, echo: bool = False) -> Sample:
    """Training only, the first step towards babi_single: two to four people each go to one place
    (all different), and every one of them is asked where they are. Only the name tells the answers
    apart, so the memory must be read by the person's name, not by the words before the place
    ("Mary is in the" after "Mary went to the kitchen.").

    `echo` (task babi_echo), a step before that: the answer is begun with a verb of moving, as the
    facts are worded ("Where is Mary? Mary travelled to the"; the verb drawn afresh, so a quarter of
    the time the fact's own), the retrieval that the magic-number format trains."""
    who = rng.sample(PEOPLE, rng.randint(2, _BABI_FACTS["babi_people"]))
    places = rng.sample(LOCATIONS, len(who))
    facts = [_fact(rng, w, _MOVE, p) for w, p in zip(who, places, strict=True)]
    depths = [rng.random() for _ in who]
    questions = [f"\nWhere is {w}? {w} {rng.choice(_MOVE) if echo else 'is in'} the" for w in who]
    body = prose_body(rng, prose, length)
    prompt, spans = place_facts(BABI_PREAMBLE + "\n", body, facts, depths, questions[0], length, gap)
    others = list(zip(questions[1:], [f" {p}." for p in places[1:]], strict=True))
    return Sample("babi_echo" if echo else "babi_people", prompt, f" {places[0]}.", places[0], depths[0],
                  follow_ups=tuple(others),
                  facts=spans)


def _room_walk(rng: random.Random, n: int) -> list[str]:
    """n numbered rooms, each different from the one before."""
    out: list[str] = []
    while len(out) < n:
        room = str(rng.randint(10 ** (ROOM_DIGITS - 1), 10 ** ROOM_DIGITS - 1))
        if not out or room != out[-1]:
            out.append(room)
    return out


def babi_moves(rng: random.Random, length: int, prose: str, gap: int = 0,
               names: list[str] | None = None, worded_as_asked: bool = False,
               numbered: bool = False) -> Sample:
    """Training only, between babi_people and babi_single: two or three people move one to three times
    each (every move somewhere else), their moves interleaved, and every one of them is asked where
    they are. The last of a person's own moves counts, so the memory must overwrite what it wrote
    under that name: babi_single's recency, with an answer per person instead of one per story.

    `names` (task babi_recall): these people instead (up to four), names the model cannot have
    learned one by one, so that it binds a place to whatever name comes, as `recall` does for numbers.
    `worded_as_asked` (task babi_where): every fact says "Mary is in the kitchen.", the answer's own
    words, so that the place follows the same bytes in the fact and in the question, as a magic
    number does.
    `numbered` (task babi_rooms): the places are rooms with four-digit numbers ("Mary went to room
    4821."; "Where is Mary? Mary is in room" " 4821."), a value like a magic number's in bAbI's
    sentences, to tell whether what the model cannot bind is the story or the nine common words."""
    who = rng.sample(PEOPLE, rng.randint(2, 3)) if names is None else names
    walks = {w: (_room_walk if numbered else _walk)(rng, rng.randint(1, 3)) for w in who}
    slots = sorted((rng.random(), w) for w in who for _ in walks[w])
    ahead = {w: iter(walks[w]) for w in who}  # a person's moves keep their order: the walk is the story
    events = [(d, w, next(ahead[w])) for d, w in slots]
    where = "room" if numbered else "the"
    questions = [f"\nWhere is {w}? {w} is in {where}" for w in who]
    body = prose_body(rng, prose, length)
    verbs = ("is in",) if worded_as_asked else _MOVE
    facts = [f"{w} {rng.choice(verbs)} room {p}." if numbered else _fact(rng, w, verbs, p)
             for _, w, p in events]
    prompt, spans = place_facts(BABI_PREAMBLE + "\n", body, facts,
                                [d for d, _, _ in events], questions[0], length, gap, ordered=True)
    last = {w: walks[w][-1] for w in who}
    others = [(q, f" {last[w]}.") for q, w in zip(questions[1:], who[1:], strict=True)]
    depth = max(d for d, w in slots if w == who[0])
    task = ("babi_where" if worded_as_asked else "babi_rooms" if numbered
            else "babi_moves" if names is None else "babi_recall")
    return Sample(task, prompt, f" {last[who[0]]}.", last[who[0]],
                  depth, follow_ups=tuple(others), facts=spans)


def babi_room(task: str, name_len: int | None = None) -> int:
    """Bytes of a bAbI prompt without prose, for the longest names (`name_len`: of made-up ones) and
    words."""
    word, verb = max(LOCATIONS + OBJECTS, key=len), max(_MOVE + _TAKE + _DROP, key=len)
    who, thing = "x" * (name_len or max(len(p) for p in PEOPLE)), max(OBJECTS, key=len)
    fact = len(f"{who} {verb} the {word}.") + 1
    question = max(len(f"\nWhere is the {thing}? The {thing} is in the"),
                   len(f"\nWhere is {who}? {who} is in the"), len(f"\nWhere is {who}? {who} {verb} the"),
                   len(f"\nHow many objects is {who} carrying? {who} is carrying"))
    return len(BABI_PREAMBLE) + 1 + _BABI_FACTS[task] * fact + question
