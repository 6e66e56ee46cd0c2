"""Training small ATLAS models: AdamW with warm-up and cosine decay, gradient clipping (`train`);
and `run_training`, which `atlas train CONFIG` calls: the synthetic tasks' batches
(training/batches.py) or a text corpus, the objective of training/objective.py, fp32 or bf16, one
process or many, checkpoints, resume, a progress bar and a loss log."""

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
from .batches import task_micro_batches
from .config import OptimConfig, TrainConfig
from .data import CorpusLoader
from .distributed import World
from .objective import LOSS_PARTS, Objective, lm_loss
from .precision import autocast

log = logging.getLogger(__name__)


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
        if not file.is_file():  # the tokenizers library would say only "No such file or directory"
            raise FileNotFoundError(f"tokenizer {file}: no such file (a tokenizer.json)")
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


def _check_same_model(out: Path, cfg: TrainConfig) -> None:
    """A run resumed in `out` must train the model it was training: another one's weights would not
    load (and its train-config.json must not be overwritten first)."""
    try:
        before = json.loads((out / "train-config.json").read_text())["model"]
    except (OSError, ValueError, KeyError):
        return  # no record to compare with: the weights' shapes are checked on loading
    now = cfg.model.model_dump(mode="json")
    if changed := sorted(k for k in now if k in before and before[k] != now[k]):
        what = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in changed[:4])
        raise ValueError(f"{out} holds a run of another model ({what}); train into a new out_dir, "
                         "or start over with --no-resume")


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
    trainer = _resume_file(out)
    earlier_layout = out / "trainer.pt"  # where earlier versions kept it
    resuming = resume and (trainer.exists() or earlier_layout.exists())
    if resuming:
        _check_same_model(out, cfg)
    model, earlier = _initial_model(cfg, device)
    saved = None
    if resuming:
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
    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    if run.step > end:  # and its record is left as it was
        raise ValueError(f"{out} is at step {run.step}, past the {end} asked for: ask for more steps, "
                         "or train into a new out_dir")
    if world.main:
        (out / "train-config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        _trim_log(out / "log.jsonl", run.step)  # steps after the checkpoint will be logged again
    model.train()
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
