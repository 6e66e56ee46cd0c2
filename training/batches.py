"""The batches of `atlas train`'s synthetic tasks (training/tasks.py): a pure function of the seed
and the step, with masks for the answers, the prompt, the answers' last bytes and the text that holds
no fact."""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import torch
from torch import Tensor

from atlas.engine.tokenizer import ByteTokenizer

from .config import DataConfig, TrainConfig
from .prompt import held_out_prose
from .tasks import make_sample, min_length


def length_at(step: int, cfg: DataConfig, rng: random.Random) -> int:
    """Log-uniform in [min_len, the curriculum's longest length at `step`]."""
    ramp = 1.0 if cfg.curriculum_steps == 0 else min(1.0, step / cfg.curriculum_steps)
    hi = cfg.min_len * (cfg.max_len / cfg.min_len) ** ramp
    return int(round(cfg.min_len * (hi / cfg.min_len) ** rng.random()))


class TaskBatch(NamedTuple):
    tokens: Tensor  # (B, W)
    answer_mask: Tensor  # (B, W - 1) over predicted positions: the scored answers
    prompt_mask: Tensor  # the prompt's other positions
    length: int  # the step's prompt length
    end_mask: Tensor  # the answers' last bytes, each ending an asked-for value (a subset of answer_mask)
    quiet: Tensor  # (B, W - 1) over input positions: the prompt's text that holds no fact (Sample.facts)
    facts: Tensor  # (B, W - 1) over input positions: the facts' own text


#: Tokens after a fact that still count as the fact's: the memory writes a key again in the next
#: chunk while it is in the Omega window's tail (8 tokens in the bundled models).
FACT_MARGIN = 8


#: The prose of a run, read once (a corpus's prose is megabytes; every step draws from it).
_prose = functools.lru_cache(maxsize=4)(held_out_prose)


def task_batch(step: int, cfg: DataConfig, seed: int, tokenizer: ByteTokenizer | None = None) -> TaskBatch:
    """The batch of `step` (a pure function of seed and step, so a resumed run sees the same data).

    Every prompt has the step's length, or its task's shortest if that is longer (rows are padded at
    the end)."""
    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed * 1_000_003 + step)
    length = length_at(step, cfg, rng)
    names, weights = zip(*cfg.tasks.items(), strict=True)
    batch = max(1, cfg.tokens_per_batch // length)
    tasks = rng.choices(names, weights, k=batch)
    prose = _prose(cfg.prose)
    samples = [make_sample(t, rng, max(length, min_length(t, cfg.key_digits)), gap=cfg.needle_gap,
                           key_digits=cfg.key_digits, prose=prose) for t in tasks]
    rows: list[tuple[list[int], list[tuple[int, int]], list[int]]] = []  # all ids, scored spans, ends
    for s in samples:
        ids = tok.encode(s.prompt)
        answer = tok.encode(s.answer)
        spans = [(len(ids), len(ids) + len(answer))]
        ids += answer
        for question, reply in s.follow_ups if cfg.follow_ups else ():
            ids += tok.encode(question)
            reply_ids = tok.encode(reply)
            spans.append((len(ids), len(ids) + len(reply_ids)))
            ids += reply_ids
        ends = [b - 1 for a, b in spans if b > a] if s.value else []
        if cfg.score_copies:
            spans += list(s.copies)
        rows.append((ids, spans, ends))
    width = max(len(ids) for ids, _, _ in rows)
    tokens = torch.full((batch, width), tok.encode(" ")[0], dtype=torch.long)
    answer_mask = torch.zeros(batch, width - 1, dtype=torch.bool)
    prompt_mask = torch.zeros(batch, width - 1, dtype=torch.bool)
    end_mask = torch.zeros(batch, width - 1, dtype=torch.bool)
    quiet = torch.zeros(batch, width - 1, dtype=torch.bool)
    facts = torch.zeros(batch, width - 1, dtype=torch.bool)
    for i, (s, (ids, spans, ends)) in enumerate(zip(samples, rows, strict=True)):
        if s.facts is not None:  # the body, up to the line of the question, less the facts
            at = lambda c, s=s: len(tok.encode(s.prompt[:c]))  # noqa: E731
            quiet[i, :at(s.prompt.rindex("\n"))] = True
            for a, b in s.facts:
                quiet[i, at(a):at(b) + FACT_MARGIN] = False
                facts[i, at(a):at(b)] = True
        tokens[i, :len(ids)] = torch.tensor(ids)
        for a, b in spans:  # the logits at position p predict token p + 1
            answer_mask[i, a - 1:b - 1] = True
        for e in ends:
            end_mask[i, e - 1] = True
        prompt_mask[i, :len(s.prompt) - 1] = True
    prompt_mask &= ~answer_mask
    return TaskBatch(tokens, answer_mask, prompt_mask, length, end_mask, quiet, facts)


MicroBatches = tuple[list[dict[str, Tensor]], dict[str, int]]


def task_micro_batches(step: int, cfg: TrainConfig, slots: list[int]) -> MicroBatches:
    """The micro-batches `slots` of the step's task batch (its rows cut into cfg.micro_batches
    parts), and the step's prompt length and rows."""
    b = task_batch(step, cfg.data, cfg.seed)
    rows = b.tokens.shape[0]
    if rows < cfg.micro_batches:
        raise ValueError(f"step {step}'s batch has {rows} rows, fewer than micro_batches "
                         f"{cfg.micro_batches}: raise data.tokens_per_batch")
    fields = {"tokens": b.tokens, "answer_mask": b.answer_mask, "prompt_mask": b.prompt_mask,
              "end_mask": b.end_mask, "quiet": b.quiet, "facts": b.facts}
    parts = {name: t.tensor_split(cfg.micro_batches) for name, t in fields.items()}
    return [{name: parts[name][k] for name in fields} for k in slots], {"length": b.length, "batch": rows}
