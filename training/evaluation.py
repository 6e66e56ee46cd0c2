"""Long-context retrieval evaluation (`atlas eval`): accuracy against context length.

For each task and length, `trials` prompts with the asked needle at evenly spaced depths run as
one batch of sessions: the prompt is streamed in pieces (the state is the same however a stream is
cut), then the answer is decoded greedily and its first number (first word, for the bAbI places)
compared with the needle's. The real-text tasks (tasks.PROSE_TASKS) read `prose`, the held-out text
of `atlas corpus build` (default: prompt.FALLBACK_PROSE)."""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from atlas.engine.model import AtlasModel
from atlas.engine.tokenizer import ByteTokenizer

from .babi import BABI_MAX_COUNT, LOCATIONS, ROOM_DIGITS
from .prompt import Sample
from .tasks import BABI_STEP_TASKS, EVAL_TASKS, first_answer, make_sample, min_length

# Chance of guessing the number: pass keys are uniform in [1, 50000]; magic numbers have 7 digits;
# a bAbI place is one of LOCATIONS (or a numbered room), a count one of 0 to BABI_MAX_COUNT.
CHANCE = {"passkey": 1 / 50000, "multi_needle": 1 / 9_000_000, "passkey_prose": 1 / 50000,
          "multi_needle_prose": 1 / 9_000_000, "babi_single": 1 / len(LOCATIONS),
          "babi_two": 1 / len(LOCATIONS), "babi_count": 1 / (BABI_MAX_COUNT + 1),
          **dict.fromkeys(BABI_STEP_TASKS, 1 / len(LOCATIONS)),
          "babi_rooms": 1 / (9 * 10 ** (ROOM_DIGITS - 1))}  # after the steps: a room is not a place word


@dataclass
class Trial:
    depth: float
    value: str
    output: str
    correct: bool
    # Teacher-forced loss (nats) of each byte of the value after the prompt, and of a decoy: another
    # value of the task's own kind and length that is not in the prompt. value < decoy is retrieval,
    # measured where greedy decoding still gets nothing right; equal means guessing from priors. By
    # byte, because recalling the first digit from the question and continuing a recalled number
    # from its first digits are separate skills.
    value_nats: list[float]
    decoy_nats: list[float]
    # The same for the byte after the value (the answer's "."): does the model know where the value
    # ends? An answer with the right digits and one too many is wrong.
    end_nats: float
    # The value's bytes come first, whatever follows: how Mohtashami & Jaggi score pass-key retrieval
    # (they generate as many tokens as the key has, so an extra digit is not seen). `correct` is
    # stricter: the model must also stop.
    prefix_correct: bool


@dataclass
class Point:
    task: str
    length: int
    trials: int
    correct: int
    accuracy: float
    chance: float
    tokens_per_s: float
    wall_s: float
    value_nats: float  # means over the trials' bytes
    decoy_nats: float
    value_nats_by_byte: list[float]  # means over the trials, by byte of the value
    decoy_nats_by_byte: list[float]
    end_nats: float  # mean over the trials
    prefix_correct: int  # trials whose output starts with the value (Trial.prefix_correct)
    details: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_length(text: str) -> int:
    """"4k" -> 4096, "1M" -> 1048576, "1000" -> 1000."""
    text = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


@torch.no_grad()
def evaluate_point(model: AtlasModel, task: str, length: int, trials: int, seed: int = 0,
                   piece: int = 1 << 16, on_progress: Callable[[int], None] | None = None,
                   gap: int = 0, prose: str | None = None) -> Point:
    """Accuracy of `model` on `trials` prompts of `length` tokens; `gap`: at least that many bytes
    between each needle and the question (e.g. the attention window, to measure the memory alone);
    `prose`: the text of the real-text tasks (prompt.held_out_prose)."""
    tok = ByteTokenizer()
    rng = random.Random(zlib.crc32(f"{seed}:{task}:{length}".encode()))
    samples = [make_sample(task, rng, length, depth=(i + 0.5) / trials, gap=gap, prose=prose)
               for i in range(trials)]
    # The byte tokenizer's ids are the prompt's bytes: kept as bytes (10 MB a trial at 10M tokens,
    # where a list of Python ints took ~360 MB) and widened a piece at a time.
    ids = torch.stack([torch.frombuffer(bytearray(s.prompt.encode("utf-8")), dtype=torch.uint8)
                       for s in samples])
    state = model.init_state(trials)
    start = time.perf_counter()
    logits = state["last_logits"]
    for i in range(0, length, piece):
        logits, state = model(ids[:, i:i + piece].to(model.device, torch.long), state, all_logits=False)
        if on_progress:
            on_progress(min(piece, length - i) * trials)
    prompt_end = logits, state
    outputs: list[list[int]] = [[] for _ in samples]
    for _ in range(max(len(s.answer) for s in samples) + 1):
        nxt = logits.argmax(-1)
        for out, t in zip(outputs, nxt.tolist(), strict=True):
            out.append(t)
        logits, state = model(nxt[:, None], state, all_logits=False)
    wall = time.perf_counter() - start
    decoys = [_decoy(s, seed) for s in samples]
    nats, ends = _value_nats(model, [s.answer for s in samples], [s.value for s in samples], *prompt_end)
    decoy_answers = [s.answer.replace(s.value, d) for s, d in zip(samples, decoys, strict=True)]
    decoy_nats, _ = _value_nats(model, decoy_answers, decoys, *prompt_end)
    details = []
    for i, (s, out) in enumerate(zip(samples, outputs, strict=True)):
        text = tok.decode(out)
        correct, prefix = score(text, s.value)
        details.append(Trial(round(s.depth, 4), s.value, text, correct, _rounded(nats[i]),
                             _rounded(decoy_nats[i]), round(ends[i], 4), prefix))
    n_correct = sum(t.correct for t in details)
    return Point(task, length, trials, n_correct, n_correct / trials, CHANCE[task],
                 round(trials * length / wall, 1), round(wall, 2), _mean(sum(nats, [])),
                 _mean(sum(decoy_nats, [])), _by_byte(nats), _by_byte(decoy_nats), _mean(ends),
                 sum(t.prefix_correct for t in details), details)


def score(output: str, value: str) -> tuple[bool, bool]:
    """(the answer's number is the value, the output starts with the value): Trial.correct and
    Trial.prefix_correct."""
    return first_answer(output, value) == value, output.startswith(f" {value}")


def _mean(xs: Sequence[float]) -> float:
    return round(sum(xs) / len(xs), 4)


def _rounded(xs: Sequence[float]) -> list[float]:
    return [round(x, 4) for x in xs]


def _by_byte(per_trial: list[list[float]]) -> list[float]:
    width = max(map(len, per_trial))
    return [_mean([t[j] for t in per_trial if len(t) > j]) for j in range(width)]


def _decoy(sample: Sample, seed: int) -> str:
    """A value drawn like `sample.value`, as long, and different."""
    rng = random.Random(zlib.crc32(f"{seed}:decoy:{sample.prompt[-64:]}:{sample.value}".encode()))
    while True:
        value = make_sample(sample.task, rng, min_length(sample.task)).value
        if len(value) == len(sample.value) and value != sample.value:
            return value


def _value_nats(model: AtlasModel, answers: list[str], values: list[str], logits: Tensor,
                state: dict) -> tuple[list[list[float]], list[float]]:
    """Per answer, the negative log-likelihood of each of its value's bytes and of the byte after
    the value, the answer fed in after the prompt (`logits`: the prompt's last; `state`: after the
    prompt, left as it was). Every answer ends with a byte after its value (" 31415.")."""
    tok = ByteTokenizer()
    ids_of = [tok.encode(a) for a in answers]
    width = max(map(len, ids_of))
    ids = torch.tensor([a + [0] * (width - len(a)) for a in ids_of], device=logits.device)
    forced, _ = model(ids[:, :-1], state, all_logits=True) if width > 1 else (logits[:, :0], None)
    logp = torch.cat([logits[:, None], forced], 1).float().log_softmax(-1)
    nll = -logp.gather(-1, ids[..., None])[..., 0]
    out, ends = [], []
    for i, (answer, value) in enumerate(zip(answers, values, strict=True)):
        start = len(tok.encode(answer[:answer.index(value)]))
        end = start + len(tok.encode(value))
        out.append(nll[i, start:end].tolist())
        ends.append(nll[i, end].item())
    return out, ends


def evaluate(model: AtlasModel, tasks: Sequence[str], lengths: Sequence[int], trials: int, seed: int = 0,
             on_point: Callable[[Point], None] | None = None,
             on_progress: Callable[[int], None] | None = None, gap: int = 0,
             prose: str | None = None) -> list[Point]:
    """Every (task, length) point; lengths a task cannot fit in (with `gap` bytes after each fact)
    are skipped. `prose`: the held-out text of the real-text tasks (default prompt.FALLBACK_PROSE)."""
    points = []
    for task in tasks:
        for length in lengths:
            if length < min_length(task) + gap:
                continue
            p = evaluate_point(model, task, length, trials, seed, on_progress=on_progress, gap=gap,
                               prose=prose)
            points.append(p)
            if on_point:
                on_point(p)
    return points


def plot(results: dict, path: str) -> None:
    """Accuracy against context length, one panel per task, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p["task"] for m in results["models"].values() for p in m["points"]},
                   key=list(EVAL_TASKS).index)
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    titles = {"passkey": "Pass-key retrieval", "multi_needle": "Multi-needle (4 keys, asked by name)",
              "passkey_prose": "Pass-key in real prose", "multi_needle_prose": "Multi-needle in real prose",
              "babi_single": "bAbI: single supporting fact", "babi_two": "bAbI: two supporting facts",
              "babi_count": "bAbI: counting", "babi_rooms": "bAbI moves, numbered rooms"}
    for ax, task in zip(axes.flat, tasks, strict=False):
        for i, (name, m) in enumerate(results["models"].items()):  # one colour per model in every panel
            pts = sorted((p["length"], 100 * p["accuracy"]) for p in m["points"] if p["task"] == task)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name, color=f"C{i}")
        chance = CHANCE.get(task, 0.0)
        if chance >= 0.01:  # a place or a count can be guessed
            ax.axhline(100 * chance, color="grey", ls="-.", lw=1, label="chance")
        ax.axvline(results["max_train_len"], color="grey", ls="--", lw=1, label="longest training context")
        window = results.get("swa_window")
        if window:
            ax.axvline(window, color="grey", ls=":", lw=1, label="attention window")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(titles.get(task, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(results.get("title", "ATLAS long-context retrieval"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
