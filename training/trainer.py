"""Training small ATLAS models: next-token loss through the chunk recurrence (autograd flows through
every memory update), AdamW with warm-up and cosine decay, gradient clipping; and `run_training`,
which `atlas train CONFIG` calls: synthetic long-context tasks (training/tasks.py) with a length
curriculum, fp32 or bf16, checkpoints, resume, a progress bar and a loss log."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from atlas.engine.api import resolve_device
from atlas.engine.checkpoint import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINING_STATE_DIR,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from atlas.engine.config import ModelConfig
from atlas.engine.machine import portable_path
from atlas.engine.model import AtlasModel
from atlas.engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

from . import distributed
from .authoring import guess_eos_token_id
from .config import DataConfig, GateConfig, OptimConfig, TrainConfig
from .data import CorpusLoader
from .distributed import World
from .precision import autocast
from .tasks import held_out_prose, make_sample, min_length

log = logging.getLogger(__name__)


def lm_loss(model: AtlasModel, tokens: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of tokens (B, T) from a fresh state; loss_mask (B, T-1) selects
    which predicted positions count."""
    return text_loss(model, tokens, loss_mask=loss_mask)[0]


def text_loss(model: AtlasModel, tokens: Tensor, gates: GateConfig | None = None,
              loss_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy of tokens (B, T) (over loss_mask's positions, if given) plus the
    gate costs, and its parts by name (`lm`, and the gates' means as in `task_loss`)."""
    logits, logged = _forward_logging_gates(model, tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    if loss_mask is None:
        ce = loss.mean()
    else:
        mask = loss_mask.flatten().to(loss.dtype)
        ce = (loss * mask).sum() / mask.sum().clamp_min(1)
    parts, costs = _gate_terms(logged, gates)
    return sum(costs, start=ce), {"lm": ce, **parts}


def make_optimizer(model: AtlasModel, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, gates' biases, feature-map coefficients)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("_init")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("_init"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: AtlasModel, batches: Iterator[tuple[Tensor, Tensor | None]], steps: int,
          cfg: OptimConfig | None = None) -> list[float]:
    """Run `steps` optimiser steps over (tokens, loss_mask) batches; returns the loss per step."""
    cfg = cfg or OptimConfig()
    opt = make_optimizer(model, cfg)
    model.train()
    losses = []
    for step in range(steps):
        tokens, mask = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg)
        loss = lm_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# `atlas train CONFIG`: synthetic long-context tasks with a length curriculum
# ---------------------------------------------------------------------------------------------


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
    for i, (s, (ids, spans, ends)) in enumerate(zip(samples, rows, strict=True)):
        if s.facts is not None:  # the body, up to the line of the question, less the facts
            at = lambda c, s=s: len(tok.encode(s.prompt[:c]))  # noqa: E731
            quiet[i, :at(s.prompt.rindex("\n"))] = True
            for a, b in s.facts:
                quiet[i, at(a):at(b) + FACT_MARGIN] = False
        tokens[i, :len(ids)] = torch.tensor(ids)
        for a, b in spans:  # the logits at position p predict token p + 1
            answer_mask[i, a - 1:b - 1] = True
        for e in ends:
            end_mask[i, e - 1] = True
        prompt_mask[i, :len(s.prompt) - 1] = True
    prompt_mask &= ~answer_mask
    return TaskBatch(tokens, answer_mask, prompt_mask, length, end_mask, quiet)


def task_loss(model: AtlasModel, tokens: Tensor, answer_mask: Tensor, prompt_mask: Tensor,
              lm_weight: float, gates: GateConfig | None = None, end_mask: Tensor | None = None,
              end_weight: float = 1.0, quiet: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean cross-entropy of the answers (the bytes of end_mask weighing end_weight, the others
    1), plus lm_weight times that of the prompt's next tokens, plus the gate costs; and its parts by
    name (answer: the plain mean, prompt, end: the mean over end_mask, and with memory layers the
    mean write gate `eta` (/ eta_max), forgetting `forget` (1 - alpha) and momentum gate `theta.i`
    of the prompt's chunks; with `quiet` (TaskBatch.quiet), `quiet.i` the mean write gate on the
    chunks that hold no fact)."""
    logits, logged = _forward_logging_gates(model, tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(answer_mask.float())
    parts = {"answer": ce[answer_mask].mean(), "prompt": ce[prompt_mask].mean()}
    answer = parts["answer"]
    if end_mask is not None and end_mask.any():
        parts["end"] = ce[end_mask].mean()
        weight = answer_mask.float() + (end_weight - 1) * end_mask.float()
        answer = (ce * weight).sum() / weight.sum().clamp_min(1e-9)
    quiet_chunks = None
    if quiet is not None and logged:
        n, size = logged[0].shape[0], model.cfg.chunk_size
        quiet_chunks = quiet[:, :n * size].reshape(quiet.shape[0], n, size).all(-1).T  # (chunks, B)
    gate_parts, costs = _gate_terms(logged, gates, quiet_chunks)
    return sum(costs, start=answer + lm_weight * parts["prompt"]), {**parts, **gate_parts}


def _forward_logging_gates(model: AtlasModel, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The logits of inputs (B, T) from a fresh state, and each memory layer's chunk gates
    (chunks, B, H, 3: eta / eta_max, alpha, theta) as the forward pass computed them."""
    mems = model.memories
    for mem in mems:
        mem.gate_log = []
    try:
        logits, _ = model(inputs, model.init_state(inputs.shape[0]))
        logged = [torch.stack(mem.gate_log).float() for mem in mems if mem.gate_log]
    finally:
        for mem in mems:
            mem.gate_log = None
    return logits, logged


def _gate_terms(logged: list[Tensor], gates: GateConfig | None, quiet: Tensor | None = None
                ) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The gates' means (write `eta`, forgetting `forget`, by layer `eta.i`, `theta.i` and, with
    quiet (chunks, B): the chunks that hold no fact, `quiet.i`) and the costs of `gates` on them
    (GateConfig: writing, forgetting, the momentum's span, writing where there is no fact)."""
    if not logged:
        return {}, []
    g = torch.stack(logged)  # (memory layers, chunks, B, H, 3)
    eta, forget, theta = g[..., 0], 1 - g[..., 1], g[..., 2]
    parts = {"eta": eta.mean(), "forget": forget.mean()}
    parts.update({f"eta.{i}": e.mean() for i, e in enumerate(eta)})
    parts.update({f"theta.{i}": t.mean() for i, t in enumerate(theta)})
    quiet_eta = None
    if quiet is not None and bool(quiet.any()):
        rows = quiet.any(0)  # prompts with fact-free chunks
        q = quiet[None, :, rows, None].float()
        quiet_eta = (eta[:, :, rows] * q).sum(1) / q.sum(1)  # (layers, rows, H)
        parts.update({f"quiet.{i}": e.mean() for i, e in enumerate(quiet_eta)})
    if gates is None:
        return parts, []
    write_w, forget_w, momentum_w, quiet_w = (torch.tensor(w, device=g.device) for w in gates.weights(len(g)))
    over_horizon = lambda x: torch.log1p(gates.horizon_chunks * x).flatten(1).mean(1)  # noqa: E731
    span = -torch.log1p(-theta.clamp_max(1 - 1e-7)).flatten(1).mean(1)  # log of 1 / (1 - theta)
    costs = [(write_w * over_horizon(eta)).mean(), (forget_w * over_horizon(forget)).mean(),
             (momentum_w * span).mean()]
    if quiet_eta is not None:
        costs.append((quiet_w * over_horizon(quiet_eta)).mean())
    return parts, costs


def _trim_log(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(keep))


def _initial_model(cfg: TrainConfig, device: torch.device) -> tuple[AtlasModel, dict]:
    """The model at step 0 (fresh, or init_from's weights) and init_from's training record, which
    this run's checkpoints keep ({} without init_from)."""
    torch.manual_seed(cfg.seed)
    model = AtlasModel(cfg.model).to(device)
    for mem in model.memories:
        mem.first_order = cfg.inner_backprop == "first_order"
    if cfg.init_from is None:
        return model, {}
    earlier = dict(read_config(cfg.init_from)[1].get("training") or {}, path=portable_path(cfg.init_from))
    try:
        keys = model.load_state_dict(load_checkpoint(cfg.init_from, device=device).state_dict(),
                                     strict=not cfg.init_partial)
    except RuntimeError as e:
        raise ValueError(f"init_from {cfg.init_from} does not fit this run's model: {e}") from e
    if keys.unexpected_keys:
        raise ValueError(f"init_from {cfg.init_from} does not fit this run's model: it has "
                         f"weights the model lacks: {keys.unexpected_keys}")
    if keys.missing_keys:
        (cfg.out_dir / "fresh-weights.txt").write_text("\n".join(keys.missing_keys) + "\n")
    return model, earlier


class Objective(nn.Module):
    """The training loss as one module, so that DDP and FSDP wrap everything a step runs (the fresh
    state and the forward pass), and one process and N compute the same function: the synthetic
    tasks' `task_loss` for a batch with answer masks, else `text_loss`."""

    def __init__(self, model: AtlasModel, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.data, self.gates = cfg.data, cfg.gates

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if "answer_mask" in batch:
            return task_loss(self.model, batch["tokens"], batch["answer_mask"], batch["prompt_mask"],
                             self.data.lm_weight, self.gates, batch["end_mask"], self.data.end_weight,
                             batch["quiet"])
        return text_loss(self.model, batch["tokens"], self.gates)


#: Parts of the loss the log names `NAME_loss`; the others are the gates' means, `mean_NAME`.
LOSS_PARTS = ("answer", "prompt", "end", "lm")

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
              "end_mask": b.end_mask, "quiet": b.quiet}
    parts = {name: t.tensor_split(cfg.micro_batches) for name, t in fields.items()}
    return [{name: parts[name][k] for name in fields} for k in slots], {"length": b.length, "batch": rows}


class _Text(NamedTuple):
    """What corpus training reads with: the tokenizer (its file, None for bytes), its
    tokenizer_config.json if any, and the end-of-sequence id (documents' separator)."""

    tokenizer: Tokenizer
    file: Path | None
    config_file: Path | None
    eos: int | None

    @classmethod
    def of(cls, cfg: TrainConfig) -> _Text:
        file = cfg.tokenizer
        if file is None and cfg.init_from is not None and (cfg.init_from / TOKENIZER_FILE).is_file():
            file = cfg.init_from / TOKENIZER_FILE
        if file is None:
            return cls(ByteTokenizer(), None, None, None)
        beside = file.with_name(TOKENIZER_CONFIG_FILE)
        config_file = beside if beside.is_file() else None
        tok_cfg = json.loads(beside.read_text()) if config_file else None
        return cls(HFTokenizer(file), file, config_file, guess_eos_token_id(file, tok_cfg))


def _with_vocab(cfg: TrainConfig, vocab: int) -> TrainConfig:
    """The config with a vocabulary of at least `vocab` (the tokenizer's size, as `atlas init`)."""
    if vocab <= cfg.model.vocab_size:
        return cfg
    return cfg.model_copy(update={"model": ModelConfig(**{**cfg.model.model_dump(), "vocab_size": vocab})})


def _checkpoint_blocks(model: AtlasModel) -> None:
    """Activation checkpointing: each block keeps only its inputs and recomputes the rest in the
    backward pass (the parameter names, so the checkpoints, stay the same)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _step_record(step: int, measured: list[dict[str, float]], info: dict[str, int], lr: float,
                 grad_norm: float, wall: float, seconds: float) -> dict[str, Any]:
    """log.jsonl's line for a step: the means over every micro-batch of every process (a part some
    micro-batches lack, such as `end`, over those that have it), and the tokens read."""
    names = dict.fromkeys(k for m in measured for k in m if k != "tokens")
    mean = {k: sum(m[k] for m in measured if k in m) / sum(k in m for m in measured) for k in names}
    tokens = int(sum(m["tokens"] for m in measured))
    rec: dict[str, Any] = {"step": step, "loss": round(mean.pop("loss"), 5)}
    rec.update({f"{k}_loss": round(mean[k], 5) for k in LOSS_PARTS if k in mean})
    rec.update({f"mean_{k}": round(v, 7) for k, v in mean.items() if k not in LOSS_PARTS})
    rec.update(length=info["length"], batch=info["batch"], lr=lr, grad_norm=round(grad_norm, 4),
               wall_s=round(wall, 2), tokens=tokens, tokens_per_s=round(tokens / max(seconds, 1e-9), 1))
    return rec


def _write_csv(out: Path) -> None:
    """log.csv from log.jsonl: one column per key any step logged."""
    import csv

    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    with (out / "log.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in recs for k in r)))
        writer.writeheader()
        writer.writerows(recs)


def _tensorboard(out: Path, step: int) -> Any:
    """A TensorBoard writer in OUT/tensorboard, or None (with a warning) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard = true, but the tensorboard package is not installed: logging to "
                    "log.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step)


def run_training(cfg: TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train per `cfg`, checkpointing to cfg.out_dir: model/ (a checkpoint folder, docs/formats.md),
    with model/training_state/trainer.pt (weights, optimiser, step, data position and RNG, to
    resume; loading ignores it), and log.jsonl (one line per step). Returns model/.

    Under torchrun (WORLD_SIZE > 1) every process runs this: they join a process group, share each
    step's micro-batches and reduce the gradients (DDP or FSDP, `cfg.parallel`); rank 0 logs and
    writes the checkpoints."""
    world = World.from_env()
    device = distributed.start(world, resolve_device(cfg.device), cfg.dist_timeout_s)
    try:
        return _run(cfg, world, device, resume, progress)
    finally:
        distributed.stop()


def _resume_file(out: Path) -> Path:
    """Where a run in `out` keeps its resume state (beside the checkpoint it resumes)."""
    return out / "model" / TRAINING_STATE_DIR / "trainer.pt"


@dataclass
class _Training:
    """A run in progress on one process: what its steps change and what its checkpoints save."""

    cfg: TrainConfig
    world: World
    device: torch.device
    model: AtlasModel
    wrapped: nn.Module
    opt: torch.optim.Optimizer
    loader: CorpusLoader | None
    text: _Text | None
    earlier: Any  # the training record of the run this one starts from (init_from)
    step: int = 0
    wall: float = 0.0
    seen: int = 0

    @property
    def resume_file(self) -> Path:
        return _resume_file(self.cfg.out_dir)

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a resume state (its weights are loaded before wrapping: see _run)."""
        distributed.load_optimizer(self.wrapped, self.opt, saved["optimizer"])
        self.step, self.wall = int(saved["step"]), float(saved["wall_s"])
        self.seen = int(saved.get("tokens", 0))
        if "rng" in saved:
            torch.set_rng_state(saved["rng"]["torch"].cpu())
            random.setstate(saved["rng"]["python"])
        if self.loader is not None:
            self.loader.load_state_dict(saved["data"]["slots"], saved["data"]["micro_batches"])

    def micro_batches(self, slots: list[int]) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
        """This process's micro-batches of the next step, and what the log says of their shape."""
        cfg = self.cfg
        if self.loader is not None and cfg.corpus is not None:
            return ([{"tokens": t} for t in self.loader.next_micro_batches()],
                    {"length": cfg.corpus.seq_len, "batch": cfg.corpus.batch_rows})
        return task_micro_batches(self.step, cfg, slots)

    def optimise(self, micro: list[dict[str, Tensor]], lr: float) -> tuple[list[dict[str, float]], float]:
        """One optimiser step over the micro-batches (gradients accumulated, synchronised on the
        last); what each micro-batch measured, and the gradient norm before clipping."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        measured: list[dict[str, float]] = []
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with distributed.gradient_sync(self.wrapped, i == len(micro) - 1):
                with autocast(self.device.type, self.cfg.precision):
                    loss, parts = self.wrapped(batch)
                (loss / len(micro)).backward()
            measured.append({"loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                             "tokens": batch["tokens"][:, 1:].numel()})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        self.step += 1
        return measured, float(grad_norm)

    def checkpoint(self) -> None:
        """Every rank takes part (FSDP gathers the shards, each rank has its slots' data position);
        rank 0 writes. The resume state first, whole (weights included): a crash while the
        checkpoint folder is written then resumes from it."""
        cfg, world, loader = self.cfg, self.world, self.loader
        weights, optim_state = distributed.full_states(self.wrapped, self.opt)
        positions = distributed.gather(loader.state_dict(), world) if loader is not None else []
        if world.main:
            state = {"model": weights, "optimizer": optim_state, "step": self.step, "wall_s": self.wall,
                     "tokens": self.seen, "processes": world.size,
                     "scheduler": {"lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps,
                                   "min_lr_ratio": cfg.optim.min_lr_ratio, "total_steps": cfg.steps},
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
            if loader is not None:
                state["data"] = {"micro_batches": cfg.micro_batches,
                                 "slots": {k: v for rank in positions for k, v in rank.items()}}
            path = self.resume_file
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            record = _record(cfg, self.step, self.wall, self.seen, self.device, world, self.earlier)
            sharded = cfg.parallel == "fsdp" and world.size > 1
            _save_model(cfg, self.model if not sharded else None, weights, cfg.out_dir / "model", record,
                        self.text)
            if cfg.log_csv:
                _write_csv(cfg.out_dir)
        distributed.barrier()


def _run(cfg: TrainConfig, world: World, device: torch.device, resume: bool, progress: bool) -> Path:
    if cfg.micro_batches % world.size:
        raise ValueError(f"micro_batches {cfg.micro_batches} cannot be shared by {world.size} processes: "
                         f"make it a multiple")
    per_rank = cfg.micro_batches // world.size
    slots = list(range(world.rank * per_rank, (world.rank + 1) * per_rank))
    text = _Text.of(cfg) if cfg.corpus is not None else None
    if text is not None:
        cfg = _with_vocab(cfg, text.tokenizer.vocab_size)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out / "train-config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    model, earlier = _initial_model(cfg, device)
    trainer = _resume_file(out)
    earlier_layout = out / "trainer.pt"  # where earlier versions kept it
    saved = None
    if resume and (trainer.exists() or earlier_layout.exists()):
        saved = torch.load(trainer if trainer.exists() else earlier_layout, map_location=device,
                           weights_only=True)
        model.load_state_dict(saved["model"])  # before FSDP shards the weights
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    wrapped = distributed.wrap(Objective(model, cfg), model, cfg.parallel, world, device)
    opt = make_optimizer(model, cfg.optim)  # after wrapping: FSDP replaces the parameters by shards
    loader = None
    if cfg.corpus is not None and text is not None:
        loader = CorpusLoader(cfg.corpus, text.tokenizer, text.eos, slots, cfg.micro_batches)
    run = _Training(cfg, world, device, model, wrapped, opt, loader, text, earlier)
    if saved is not None:
        run.restore(saved)
    if world.main:
        _trim_log(out / "log.jsonl", run.step)  # steps after the checkpoint will be logged again
    model.train()
    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    bar = tqdm(total=end, initial=run.step, disable=not (progress and world.main), desc=cfg.name, unit="step")
    board = _tensorboard(out, run.step) if cfg.tensorboard and world.main else None
    with (out / "log.jsonl").open("a") if world.main else contextlib.nullcontext() as log_file:
        while run.step < end:
            start = time.perf_counter()
            micro, info = run.micro_batches(slots)
            lr = lr_at(run.step, cfg.steps, cfg.optim)
            measured, grad_norm = run.optimise(micro, lr)
            everything = [m for rank in distributed.gather(measured, world) for m in rank]
            seconds = time.perf_counter() - start
            run.wall += seconds
            rec = _step_record(run.step, everything, info, lr, grad_norm, run.wall, seconds)
            run.seen += rec["tokens"]
            if log_file is not None:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            if board is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, int | float):
                        board.add_scalar(k, v, run.step)
            bar.update(1)
            bar.set_postfix(_postfix(rec, world.size))
            if run.step % cfg.checkpoint_every == 0 or run.step == end:
                run.checkpoint()
    bar.close()
    if board is not None:
        board.close()
    model.eval()
    return out / "model"


def _postfix(rec: dict[str, Any], processes: int) -> dict[str, str]:
    """What the progress bar shows: the losses, the learning rate, tokens/s per process, the write
    gate's mean."""
    shown = {k.removesuffix("_loss"): f"{v:.3f}" for k, v in rec.items() if k.endswith("_loss")}
    shown = {"loss": f"{rec['loss']:.3f}", **shown, "lr": f"{rec['lr']:.1e}",
             "tok/s/proc": f"{rec['tokens_per_s'] / processes:,.0f}"}
    if "mean_eta" in rec:
        shown["eta"] = f"{rec['mean_eta']:.3f}"
    if "length" in rec:
        shown["len"] = str(rec["length"])
    return shown


def _record(cfg: TrainConfig, step: int, wall: float, seen: int, device: torch.device, world: World,
            earlier: dict) -> dict[str, Any]:
    """config.json's `training` record of the run so far."""
    rec: dict[str, Any] = {"name": cfg.name, "steps": step, "wall_s": round(wall, 1), "device": str(device),
                           "precision": cfg.precision, "seed": cfg.seed}
    if cfg.corpus is None:
        rec.update(max_train_len=max(cfg.data.max_len, earlier.get("max_train_len", 0)), tasks=cfg.data.tasks)
    else:
        rec.update(max_train_len=max(cfg.corpus.seq_len, earlier.get("max_train_len", 0)), tokens=seen,
                   corpus=[portable_path(f) for f in cfg.corpus.files])
    if world.size > 1:
        rec.update(processes=world.size, parallel=cfg.parallel)
    if earlier:
        rec["init_from"] = earlier
    return rec


def _save_model(cfg: TrainConfig, model: AtlasModel | None, weights: dict[str, Tensor], path: Path,
                record: dict[str, Any], text: _Text | None) -> Path:
    """The checkpoint folder of `model`, or (None: FSDP, whose parameters are shards) of a model
    made from the gathered weights; with the tokenizer of a corpus run and its end-of-sequence id."""
    if model is None:
        with torch.device("meta"):
            model = AtlasModel(cfg.model)
        model.load_state_dict(weights, assign=True)
    if text is None:
        return save_checkpoint(model, path, extra={"training": record})
    return save_checkpoint(model, path, extra={"training": record}, tokenizer=text.file,
                           tokenizer_config=text.config_file, generation_config={"eos_token_id": text.eos})
