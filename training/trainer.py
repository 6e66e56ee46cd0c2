"""Training small ATLAS models: next-token loss through the chunk recurrence (autograd flows through
every memory update), AdamW with warm-up and cosine decay, gradient clipping; and `run_training`,
which `atlas train CONFIG` calls: synthetic long-context tasks (training/tasks.py) with a length
curriculum, fp32 or bf16, checkpoints, resume, a progress bar and a loss log."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from tqdm import tqdm

from atlas.engine.api import resolve_device
from atlas.engine.checkpoint import TRAINING_STATE_DIR, load_checkpoint, read_config, save_checkpoint
from atlas.engine.config import ModelConfig
from atlas.engine.machine import portable_path
from atlas.engine.model import AtlasModel
from atlas.engine.tokenizer import ByteTokenizer

from .tasks import KEY_DIGITS, TRAIN_TASKS, make_sample, min_length

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class OptimConfig(BaseModel):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


def lm_loss(model: AtlasModel, tokens: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of tokens (B, T) from a fresh state; loss_mask (B, T-1) selects
    which predicted positions count."""
    logits, _ = model(tokens[:, :-1], model.init_state(tokens.shape[0]))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    if loss_mask is None:
        return loss.mean()
    mask = loss_mask.flatten().to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


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


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, float] = Field(default_factory=lambda: {"passkey": 0.5, "multi_needle": 0.5})
    min_len: int = Field(512, ge=16)
    max_len: int = Field(8192, ge=16)  # the model never sees a longer context in training
    curriculum_steps: int = Field(1000, ge=0)  # the longest length grows from min_len to max_len
    tokens_per_batch: int = Field(16384, ge=1)  # batch size = tokens_per_batch // length (at least 1)
    lm_weight: float = Field(0.1, ge=0)  # weight of next-token loss on the prompt beside the answer's
    # Score more than the one answer: the questions about a prompt's other needles (asked after the
    # first answer) and the key's second mention inside the pass-key needle.
    follow_ups: bool = True
    score_copies: bool = True
    # At least this many bytes of filler after each needle (e.g. the attention window, so that
    # only the memory can answer); 0 places needles anywhere.
    needle_gap: int = Field(0, ge=0)
    # The longest key of passkey_any_length and passkey_runs (standard keys, 1 to 50000, have five).
    key_digits: int = Field(KEY_DIGITS, ge=1, le=9)
    # Weight of the byte that ends each asked-for value (the answer's "."), against 1 for the
    # answers' other bytes: the one decision no digit of the memory makes, where a key stops.
    end_weight: float = Field(1.0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, float]) -> dict[str, float]:
        if bad := sorted(set(tasks) - set(TRAIN_TASKS)):
            raise ValueError(f"unknown task(s) {bad}; choose from {list(TRAIN_TASKS)}")
        if not tasks or min(tasks.values()) < 0 or sum(tasks.values()) <= 0:
            raise ValueError("task weights must be >= 0 and not all zero")
        return tasks


NonNegative = Annotated[float, Field(ge=0)]


class GateConfig(BaseModel):
    """Costs on the memory's chunk gates, added to the loss. A prompt of at most 8k tokens is 128
    chunks, too few for writing on filler or a slow leak of retention to hurt its answer, yet over a
    million tokens (16,384 chunks) both wipe a needle out: Muon's orthogonalised update has the
    same size however small the gradient, so even a faint write on every chunk of filler adds up.
    Each cost is log(1 + horizon * x_j) averaged over chunks, x_j the write gate eta_j / eta_max or
    the forgetting 1 - alpha_j: horizon * x_j is what `horizon_chunks` chunks like j would write or
    forget in all. Logarithmic, so that its pull on the gate's logit stays the same until that total
    is about 1 (where a plain mean would fade as the gate closes), and one chunk that must write
    (or forget) costs a bounded amount.

    The momentum's gate theta_j has the same blind spot from the other side: with theta near 1 the
    momentum S sums the gradients of about 1 / (1 - theta) chunks, and until then it keeps growing
    with the prompt. A model trained on 128 chunks never sees it full, yet far into a long prompt
    the needle's gradient is added to the sum of hundreds of chunks of filler gradients, and Muon
    orthogonalises the sum. `momentum_cost` charges the logarithm of that span, -log(1 - theta_j),
    averaged over chunks: a steady pull on the gate's logit (theta itself), so that the momentum
    fills within the lengths seen in training."""

    model_config = ConfigDict(extra="forbid")

    # One weight for every memory layer, or one per memory layer (in block order).
    write_cost: NonNegative | list[NonNegative] = 0.0
    forget_cost: NonNegative | list[NonNegative] = 0.0
    momentum_cost: NonNegative | list[NonNegative] = 0.0
    horizon_chunks: int = Field(16384, ge=1)  # a million tokens of 64-token chunks

    def weights(self, n_layers: int) -> tuple[list[float], list[float], list[float]]:
        """(write, forget, momentum) weight of each of `n_layers` memory layers."""
        out = []
        for name in ("write_cost", "forget_cost", "momentum_cost"):
            cost = getattr(self, name)
            if isinstance(cost, list) and len(cost) != n_layers:
                raise ValueError(f"gates.{name} lists {len(cost)} weights for {n_layers} memory layers")
            out.append(cost if isinstance(cost, list) else [cost] * n_layers)
        return out[0], out[1], out[2]


class TrainConfig(BaseModel):
    """One training run, as read from a TOML or JSON file by `atlas train`."""

    model_config = ConfigDict(extra="forbid")

    name: str = "atlas"
    seed: int = 0
    steps: int = Field(1000, ge=1)
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls; weights, W and S stay fp32
    out_dir: Path = Path("runs/atlas")
    checkpoint_every: int = Field(100, ge=1)
    # End the run after this step's checkpoint, still on the learning-rate schedule of `steps` (a run
    # is deterministic, so this reproduces a checkpoint taken part-way; running again with a later
    # stop_after, or none, continues it).
    stop_after: int | None = Field(None, ge=1)
    # Start from these weights (a checkpoint directory) instead of a fresh initialisation, e.g. a
    # second phase on longer gaps. Their shapes must fit `model`; its other knobs apply from here on.
    init_from: Path | None = None
    # With init_from: weights the checkpoint lacks keep their fresh initialisation (e.g. attention
    # added to a memory-only model); everything it has must still fit.
    init_partial: bool = False
    # Backprop through the memory recurrence: "full", or "first_order" (no autograd through the inner
    # gradient's dependence on the weights; see memory.chunk_update). The forward pass is the same.
    inner_backprop: Literal["full", "first_order"] = "first_order"
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    gates: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _gate_costs_fit(self) -> TrainConfig:
        self.gates.weights(sum(m != "swa" for m in self.model.mixers))
        return self

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        text = path.read_text()
        doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls(**doc)


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
    samples = [make_sample(t, rng, max(length, min_length(t, cfg.key_digits)), gap=cfg.needle_gap,
                           key_digits=cfg.key_digits) for t in tasks]
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
    for i, (s, (ids, spans, ends)) in enumerate(zip(samples, rows, strict=True)):
        tokens[i, :len(ids)] = torch.tensor(ids)
        for a, b in spans:  # the logits at position p predict token p + 1
            answer_mask[i, a - 1:b - 1] = True
        for e in ends:
            end_mask[i, e - 1] = True
        prompt_mask[i, :len(s.prompt) - 1] = True
    prompt_mask &= ~answer_mask
    return TaskBatch(tokens, answer_mask, prompt_mask, length, end_mask)


def task_loss(model: AtlasModel, tokens: Tensor, answer_mask: Tensor, prompt_mask: Tensor,
              lm_weight: float, gates: GateConfig | None = None, end_mask: Tensor | None = None,
              end_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean cross-entropy of the answers (the bytes of end_mask weighing end_weight, the others
    1), plus lm_weight times that of the prompt's next tokens, plus the gate costs; and its parts by
    name (answer: the plain mean, prompt, end: the mean over end_mask, and with memory layers the
    mean write gate `eta` (/ eta_max), forgetting `forget` (1 - alpha) and momentum gate `theta.i`
    of the prompt's chunks)."""
    mems = model.memories
    for mem in mems:
        mem.gate_log = []
    try:
        logits, _ = model(tokens[:, :-1], model.init_state(tokens.shape[0]))
        logged = [torch.stack(mem.gate_log).float() for mem in mems if mem.gate_log]
    finally:
        for mem in mems:
            mem.gate_log = None
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(answer_mask.float())
    parts = {"answer": ce[answer_mask].mean(), "prompt": ce[prompt_mask].mean()}
    answer = parts["answer"]
    if end_mask is not None and end_mask.any():
        parts["end"] = ce[end_mask].mean()
        weight = answer_mask.float() + (end_weight - 1) * end_mask.float()
        answer = (ce * weight).sum() / weight.sum().clamp_min(1e-9)
    total = answer + lm_weight * parts["prompt"]
    if logged:
        g = torch.stack(logged)  # (memory layers, chunks, B, H, 3)
        eta, forget, theta = g[..., 0], 1 - g[..., 1], g[..., 2]
        parts["eta"], parts["forget"] = eta.mean(), forget.mean()
        parts.update({f"eta.{i}": e.mean() for i, e in enumerate(eta)})
        parts.update({f"theta.{i}": t.mean() for i, t in enumerate(theta)})
        if gates is not None:
            write_w, forget_w, momentum_w = (torch.tensor(w, device=g.device) for w in gates.weights(len(g)))
            over_horizon = lambda x: torch.log1p(gates.horizon_chunks * x).flatten(1).mean(1)  # noqa: E731
            span = -torch.log1p(-theta.clamp_max(1 - 1e-7)).flatten(1).mean(1)  # log of 1 / (1 - theta)
            total = (total + (write_w * over_horizon(eta)).mean() + (forget_w * over_horizon(forget)).mean()
                     + (momentum_w * span).mean())
    return total, parts


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


def run_training(cfg: TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train per `cfg`, checkpointing to cfg.out_dir: model/ (a checkpoint folder, docs/formats.md),
    with model/training_state/trainer.pt (weights, optimiser and step, to resume; loading ignores
    it), and log.jsonl (one line per step). Returns model/."""
    device = resolve_device(cfg.device)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "train-config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    model, earlier = _initial_model(cfg, device)
    opt = make_optimizer(model, cfg.optim)
    step, wall = 0, 0.0
    trainer = out / "model" / TRAINING_STATE_DIR / "trainer.pt"
    earlier_layout = out / "trainer.pt"  # where earlier versions kept it
    if resume and (trainer.exists() or earlier_layout.exists()):
        saved = torch.load(trainer if trainer.exists() else earlier_layout, map_location=device,
                           weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, wall = int(saved["step"]), float(saved["wall_s"])
    _trim_log(out / "log.jsonl", step)  # steps after the checkpoint will be logged again
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    bar = tqdm(total=end, initial=step, disable=not progress, desc=cfg.name, unit="step")

    def checkpoint() -> Path:
        # The resume state first, whole (weights included): a crash while the checkpoint folder is
        # written then resumes from it. Nothing else is needed to resume: the batch of a step is a
        # pure function of (seed, step) and training draws no other random numbers.
        trainer.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "wall_s": wall}, trainer.with_suffix(".tmp"))
        trainer.with_suffix(".tmp").replace(trainer)
        meta = {"training": {"name": cfg.name, "steps": step, "wall_s": round(wall, 1),
                             "device": str(device), "precision": cfg.precision, "seed": cfg.seed,
                             "max_train_len": max(cfg.data.max_len, earlier.get("max_train_len", 0)),
                             "tasks": cfg.data.tasks}}
        if earlier:
            meta["training"]["init_from"] = earlier
        return save_checkpoint(model, out / "model", extra=meta)

    with (out / "log.jsonl").open("a") as log:
        while step < end:
            start = time.perf_counter()
            tokens, answer_mask, prompt_mask, length, end_mask = task_batch(step, cfg.data, cfg.seed)
            tokens, answer_mask, prompt_mask, end_mask = (t.to(device) for t in (tokens, answer_mask,
                                                                                  prompt_mask, end_mask))
            lr = lr_at(step, cfg.steps, cfg.optim)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast:
                loss, parts = task_loss(model, tokens, answer_mask, prompt_mask, cfg.data.lm_weight,
                                        cfg.gates, end_mask, cfg.data.end_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            step += 1
            wall += time.perf_counter() - start
            gate_means = {f"mean_{k}": round(v.item(), 7) for k, v in parts.items()
                          if k not in ("answer", "prompt", "end")}
            losses = {f"{k}_loss": round(parts[k].item(), 5)
                      for k in ("answer", "prompt", "end") if k in parts}
            rec = {"step": step, "loss": round(loss.item(), 5), **losses, **gate_means,
                   "length": length, "batch": tokens.shape[0],
                   "lr": lr, "grad_norm": round(float(grad_norm), 4), "wall_s": round(wall, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(answer=f"{rec['answer_loss']:.3f}", prompt=f"{rec['prompt_loss']:.3f}",
                            len=length)
            if step % cfg.checkpoint_every == 0 or step == end:
                checkpoint()
    bar.close()
    model.eval()
    return out / "model"
