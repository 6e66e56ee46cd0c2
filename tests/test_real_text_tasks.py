"""Issue 30's data and evaluation side: the corpus builder, the real-text tasks and their `atlas eval`."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas.server.cli import app
from atlas.training.babi import _DROP, _MOVE, _TAKE, PEOPLE
from atlas.training.corpus import Root, build_corpus, gather, split_of
from atlas.training.evaluation import _decoy, score
from atlas.training.prompt import FALLBACK_PROSE, held_out_prose, normalize_prose, prose_body
from atlas.training.tasks import PROSE_TASKS, first_answer, make_sample, min_length

from .helpers import shared_text

LINE = "The quick brown fox jumps over the lazy dog near the river bank today.\n"
NOVEL = "".join(f"{i}. {LINE}" for i in range(1000))  # 76 kB: cut into three pieces


def _fake_tree(root: Path) -> list[Root]:
    """A folder of texts, a standard library and a site-packages in miniature."""
    shared, stdlib, site = root / "texts", root / "lib", root / "site"
    files = {
        shared / "novel.txt": NOVEL,
        shared / "image.png": LINE * 10,  # not a text suffix
        stdlib / "json" / "decoder.py": "def f():\n    return 1\n" * 20,
        stdlib / "json" / "copy_of_decoder.py": "def f():\n    return 1\n" * 20,  # a duplicate
        stdlib / "test" / "test_json.py": "assert True\n" * 40,  # tests are left out
        stdlib / "tiny.py": "x = 1\n",  # under MIN_BYTES
        site / "pkg-1.0.dist-info" / "METADATA": "Name: pkg\n\nA package that does things.\n" * 10,
        site / "pkg-1.0.dist-info" / "licenses" / "LICENSE": "Permission is hereby granted.\n" * 20,
        site / "pkg-1.0.dist-info" / "RECORD": "pkg/__init__.py,sha256=x,1\n" * 20,
        site / "pkg" / "README.md": "# pkg\n\nRead me, please.\n" * 20,
        site / "pkg" / "words.txt": "alpha\nbeta\n" * 50,  # data, not docs
        site / "pkg" / "bad.md": "caf\xe9 " * 100,  # written as latin-1 below: not UTF-8
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1" if path.name == "bad.md" else "utf-8"))
    return [Root("texts", shared, "texts"), Root("stdlib", stdlib, "a standard library"),
            Root("site-packages", site, "installed packages")]


def test_corpus_builder_splits_dedups_and_describes_without_machine_paths(tmp_path):
    roots = _fake_tree(tmp_path / "tree")
    pieces, dropped = gather(roots)
    labels = [p.label for p in pieces]
    assert dropped == 1 and "stdlib/json/copy_of_decoder.py" in labels  # first label in sorted order
    assert "stdlib/json/decoder.py" not in labels
    assert {lab.split("#")[0] for lab in labels} == {
        "texts/novel.txt", "stdlib/json/copy_of_decoder.py", "site-packages/pkg-1.0.dist-info/METADATA",
        "site-packages/pkg-1.0.dist-info/licenses/LICENSE", "site-packages/pkg/README.md"}
    novel = [p for p in pieces if p.label.startswith("texts/novel.txt#")]
    assert len(novel) == 3 and "".join(p.text for p in novel) == NOVEL
    assert {p.kind for p in pieces if p.label.startswith("stdlib/")} == {"code"}

    a = build_corpus(tmp_path / "a", seed=0, roots=roots)
    b = build_corpus(tmp_path / "b", seed=0, roots=roots)
    assert a == b  # deterministic, to the byte
    for name in a["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert all(e["split"] == split_of(e["label"], 0) for e in a["pieces"])
    manifest = (tmp_path / "a" / "manifest.json").read_text()
    assert str(tmp_path) not in manifest and json.loads(manifest)["duplicates_dropped"] == 1
    # about a tenth held out, by label alone; another seed, another split
    held = [split_of(f"stdlib/m{i}.py") for i in range(2000)]
    assert 150 < held.count("eval") < 250
    assert held != [split_of(f"stdlib/m{i}.py", seed=1) for i in range(2000)]


def _facts(prompt: str) -> list[tuple[str, str, str]]:
    """(person, action, what) of every bAbI fact in the prompt, in order."""
    verbs = "|".join(re.escape(v) for v in (*_MOVE, *_TAKE, *_DROP))
    pattern = rf"\b({'|'.join(PEOPLE)}) ({verbs}) the (\w+)\."
    kind = {**{v: "move" for v in _MOVE}, **{v: "take" for v in _TAKE}, **{v: "drop" for v in _DROP}}
    return [(who, kind[verb], what) for who, verb, what in re.findall(pattern, prompt)]


def _solve(prompt: str) -> str:
    """The answer to the prompt's question, by playing its story out."""
    where: dict[str, str] = {}
    holder: dict[str, str] = {}
    for who, action, what in _facts(prompt):
        if action == "move":
            where[who] = what
        elif action == "take":
            holder[what] = who
        else:
            holder.pop(what)
    question = prompt[prompt.rindex("\n") + 1:]
    if m := re.match(r"Where is the (\w+)\?", question):
        return where[holder[m.group(1)]]
    if m := re.match(r"Where is (\w+)\?", question):
        return where[m.group(1)]
    m = re.match(r"How many objects is (\w+) carrying\?", question)
    assert m, question
    return str(sum(h == m.group(1) for h in holder.values()))


@pytest.mark.parametrize("task", PROSE_TASKS)
def test_real_text_samples_answer_from_their_text_at_length_and_seed(task):
    prose = held_out_prose()
    for seed in range(30):
        length = random.Random(seed).choice([min_length(task), 700, 2000, 5000])
        s = make_sample(task, random.Random(seed), length, prose=prose)
        assert len(s.prompt) == len(s.prompt.encode()) == length
        assert make_sample(task, random.Random(seed), length, prose=prose) == s
        assert s.answer == f" {s.value}." and score(s.answer, s.value) == (True, True)
        if task.startswith("babi_"):
            assert _solve(s.prompt) == s.value
        else:
            assert s.prompt.count(s.value) == 2 if task == "passkey_prose" else 1
        assert _decoy(s, 0) != s.value
    with pytest.raises(ValueError):
        make_sample(task, random.Random(0), min_length(task) // 2)


def test_babi_answers_follow_the_last_move_and_facts_sit_at_their_depth():
    changed = 0
    for seed in range(60):
        s = make_sample("babi_single", random.Random(seed), 4000, depth=0.5)
        asked = s.prompt[s.prompt.rindex("\n") + 1:].split()[2].rstrip("?")
        moves = [what for who, _, what in _facts(s.prompt) if who == asked]
        assert len(moves) >= 2 and moves[-1] == s.value
        changed += moves[0] != s.value
        last = s.prompt.rindex(f"{asked} ", 0, s.prompt.rindex("\n"))  # the deciding fact: half way
        assert 0.4 < last / 4000 < 0.6
    assert changed > 30  # the first move is usually not the answer: the last one counts
    counts = {make_sample("babi_count", random.Random(seed), 3000).value for seed in range(80)}
    assert counts == {"0", "1", "2", "3"}


def _asked_everyone(s, where: dict[str, str]) -> int:
    """Checks that every person of `where` (name -> place) is asked where they are, in the bAbI
    wording, with their place as the answer; how many were asked."""
    asked = [(s.prompt[s.prompt.rindex("\n"):], s.answer), *s.follow_ups]
    assert len(asked) == len(where)
    for question, answer in asked:
        who = question.split()[2].rstrip("?")
        assert question == f"\nWhere is {who}? {who} is in the" and answer == f" {where[who]}."
    return len(asked)


def test_babi_people_asks_everyone_where_their_one_move_took_them():
    sizes = set()
    for seed in range(30):
        s = make_sample("babi_people", random.Random(seed), min_length("babi_people") + 500 * (seed % 3))
        where = {who: what for who, _, what in _facts(s.prompt)}
        assert _asked_everyone(s, where) == len(s.facts) and len(set(where.values())) == len(where)
        sizes.add(len(where))
    assert sizes == {2, 3, 4}


def test_babi_moves_asks_everyone_where_the_last_of_their_moves_took_them():
    overwritten = 0
    for seed in range(40):
        s = make_sample("babi_moves", random.Random(seed), min_length("babi_moves") + 500 * (seed % 3))
        assert len(s.prompt) == min_length("babi_moves") + 500 * (seed % 3)
        moves: dict[str, list[str]] = {}
        for who, _, what in _facts(s.prompt):  # in the order the prompt tells them
            moves.setdefault(who, []).append(what)
        assert _asked_everyone(s, {w: m[-1] for w, m in moves.items()}) in (2, 3)
        assert len(s.facts) == sum(map(len, moves.values()))
        for walk in moves.values():
            assert all(a != b for a, b in itertools.pairwise(walk))  # each move goes elsewhere
            overwritten += len(walk) > 1
    assert overwritten > 40  # most answers overwrite an earlier place


def test_babi_recall_is_babi_moves_under_made_up_names():
    counts = set()
    for seed in range(40):
        length = min_length("babi_recall") + 500 * (seed % 3)
        s = make_sample("babi_recall", random.Random(seed), length)
        assert s.task == "babi_recall" and len(s.prompt) == length
        verbs = "|".join(re.escape(v) for v in _MOVE)
        moves: dict[str, list[str]] = {}
        for who, what in re.findall(rf"\b([A-Z][a-z]+) (?:{verbs}) the (\w+)\.", s.prompt):
            moves.setdefault(who, []).append(what)
        assert not set(moves) & set(PEOPLE) and len(s.facts) == sum(map(len, moves.values()))
        counts.add(_asked_everyone(s, {w: m[-1] for w, m in moves.items()}))
    assert counts == {2, 3, 4}


def test_babi_where_words_every_fact_as_its_answer_is_asked():
    for seed in range(30):
        length = min_length("babi_where") + 400 * (seed % 3)
        s = make_sample("babi_where", random.Random(seed), length)
        assert s.task == "babi_where" and len(s.prompt) == length
        facts = re.findall(rf"\b({'|'.join(PEOPLE)}) is in the (\w+)\.", s.prompt)
        assert len(facts) == len(s.facts) and not _facts(s.prompt)  # no verb of moving
        _asked_everyone(s, dict(facts))  # the last fact of each person wins


def test_babi_rooms_moves_people_between_numbered_rooms():
    for seed in range(30):
        length = min_length("babi_rooms") + 400 * (seed % 3)
        s = make_sample("babi_rooms", random.Random(seed), length)
        assert s.task == "babi_rooms" and len(s.prompt) == length
        verbs = "|".join(re.escape(v) for v in _MOVE)
        moves: dict[str, list[str]] = {}
        for who, room in re.findall(rf"\b({'|'.join(PEOPLE)}) (?:{verbs}) room (\d{{4}})\.", s.prompt):
            moves.setdefault(who, []).append(room)
        assert len(s.facts) == sum(map(len, moves.values())) and not _facts(s.prompt)
        asked = [(s.prompt[s.prompt.rindex("\n"):], s.answer), *s.follow_ups]
        assert len(asked) == len(moves) in (2, 3)
        for question, answer in asked:
            who = question.split()[2].rstrip("?")
            assert question == f"\nWhere is {who}? {who} is in room" and answer == f" {moves[who][-1]}."
        assert all(a != b for walk in moves.values() for a, b in itertools.pairwise(walk))
        assert first_answer(s.answer, s.value) == s.value and _decoy(s, 0) != s.value


def test_babi_echo_begins_each_answer_with_a_verb_of_moving():
    verbs = set()
    for seed in range(30):
        s = make_sample("babi_echo", random.Random(seed), min_length("babi_echo") + 400 * (seed % 3))
        assert s.task == "babi_echo" and len(s.prompt) == min_length("babi_echo") + 400 * (seed % 3)
        where = {who: what for who, _, what in _facts(s.prompt)}
        for question, answer in [(s.prompt[s.prompt.rindex("\n"):], s.answer), *s.follow_ups]:
            m = re.fullmatch(rf"\nWhere is (\w+)\? \1 ({'|'.join(_MOVE)}) the", question)
            assert m and answer == f" {where[m.group(1)]}."
            verbs.add(m.group(2))
    assert verbs == set(_MOVE)  # drawn afresh, not only the fact's own


def test_prose_source_reads_a_corpus_and_falls_back(tmp_path):
    assert held_out_prose() == normalize_prose(FALLBACK_PROSE)
    (tmp_path / "eval-prose.txt").write_text("Caf\u00e9 noir.\n\n  Tea   time. " * 200)
    text = held_out_prose(tmp_path)
    assert text.startswith("Caf noir. Tea time. ") and text.isascii()
    body = prose_body(random.Random(0), text, 10_000)
    assert len(body) == 10_000 and "  " not in body
    real = shared_text("tinyshakespeare.txt")  # real text when this machine has it
    prose = held_out_prose(real) if real else text
    s = make_sample("passkey_prose", random.Random(3), 3000, prose=prose)
    assert s.prompt.count(s.value) == 2 and len(s.prompt) == 3000


def test_atlas_eval_runs_a_real_text_task(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "eval-prose.txt").write_text(normalize_prose(FALLBACK_PROSE) + " The end.")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--tasks", "babi_single,passkey_prose", "--lengths", "600",
                                   "--trials", "1", "--prose", str(tmp_path / "corpus"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    points = results["models"]["demo"]["points"]
    assert [p["task"] for p in points] == ["babi_single", "passkey_prose"]
    assert all(p["trials"] == 1 and p["length"] == 600 for p in points)
    assert results["prose"]["source"] == "corpus" and str(tmp_path) not in out.read_text()


def test_atlas_eval_runs_the_babi_steps_with_their_chance(tmp_path):
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--tasks", "babi_rooms,babi_moves", "--lengths", "700",
                                   "--trials", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    points = json.loads(out.read_text())["models"]["demo"]["points"]
    assert [(p["task"], p["trials"]) for p in points] == [("babi_rooms", 2), ("babi_moves", 2)]
    rooms, moves = points
    assert rooms["chance"] == 1 / 9000 and moves["chance"] == 1 / 9
    assert all(t["value"].isdigit() and len(t["value"]) == 4 for t in rooms["details"])
    assert all(t["value"].isalpha() for t in moves["details"])
    # training-only tasks with several answers a prompt stay out of atlas eval
    assert CliRunner().invoke(app, ["eval", "--tasks", "recall_prose"]).exit_code == 2


def test_training_draws_the_prose_of_its_config(tmp_path) -> None:
    from atlas.training.batches import task_batch
    from atlas.training.config import DataConfig

    text = " ".join(f"The lighthouse keeper number {i} counted gulls at dawn." for i in range(200))
    (tmp_path / "train-prose.txt").write_text(text)
    cfg = DataConfig(tasks={"passkey_prose": 1.0}, min_len=1024, max_len=1024, curriculum_steps=0,
                     tokens_per_batch=2048, prose=tmp_path / "train-prose.txt")
    rows = task_batch(0, cfg, seed=0).tokens
    assert b"lighthouse keeper" in bytes(rows[0].tolist())
    plain = task_batch(0, cfg.model_copy(update={"prose": None}), seed=0).tokens
    assert b"lighthouse keeper" not in bytes(plain[0].tolist())
