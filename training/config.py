"""What a training run is told: the configuration `atlas train` reads from a TOML or JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atlas.engine.config import ModelConfig

from .data import CorpusConfig
from .tasks import KEY_DIGITS, TRAIN_TASKS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the cosine decay's floor, a share of lr
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)  # the bound on the gradient norm


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
    # The text the real-text tasks (passkey_prose, babi_single, ...) hide their facts in: a text
    # file, e.g. the train-prose.txt of `atlas corpus build` (its eval-prose.txt is held out for
    # `atlas eval --prose`); unset: a short built-in passage.
    prose: Path | None = None

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, float]) -> dict[str, float]:
        if bad := sorted(set(tasks) - set(TRAIN_TASKS)):
            raise ValueError(f"unknown task(s) {bad}; choose from {list(TRAIN_TASKS)}")
        if not tasks or min(tasks.values()) < 0 or sum(tasks.values()) <= 0:
            raise ValueError("task weights must be >= 0 and not all zero")
        return tasks

    @model_validator(mode="after")
    def _lengths_in_order(self) -> DataConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len {self.min_len} is over max_len {self.max_len}")
        return self


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
    fills within the lengths seen in training.

    `quiet_write_cost` prices what the layer writes where a prompt holds no fact (the tasks that
    mark their facts; chunks that overlap none): log(1 + horizon * mean eta_j over those chunks),
    the write that a million tokens of such text add up to, against the one chunk that holds a fact.
    The per-chunk log of `write_cost` lets a gate open on one chunk in a hundred at a bounded price:
    within 8k tokens that is one chunk, over a million it is 160 writes on top of the fact.

    `fact_write_cost` prices the other side: -log eta_j on the chunks that hold part of a fact, the
    logistic loss of the gate's logit. A gate that the other costs have shut on a kind of fact (the
    model never wrote it, so the answer's loss reaches the gate through a vanishing sigmoid) is
    pulled open there with a gradient that does not vanish."""

    model_config = ConfigDict(extra="forbid")

    # One weight for every memory layer, or one per memory layer (in block order).
    write_cost: NonNegative | list[NonNegative] = 0.0
    forget_cost: NonNegative | list[NonNegative] = 0.0
    momentum_cost: NonNegative | list[NonNegative] = 0.0
    quiet_write_cost: NonNegative | list[NonNegative] = 0.0
    fact_write_cost: NonNegative | list[NonNegative] = 0.0
    horizon_chunks: int = Field(16384, ge=1)  # a million tokens of 64-token chunks

    def weights(self, n_layers: int) -> tuple[list[float], ...]:
        """(write, forget, momentum, quiet write, fact write) weight of each of `n_layers` memory
        layers."""
        out = []
        for name in ("write_cost", "forget_cost", "momentum_cost", "quiet_write_cost", "fact_write_cost"):
            cost = getattr(self, name)
            if isinstance(cost, list) and len(cost) != n_layers:
                raise ValueError(f"gates.{name} lists {len(cost)} weights for {n_layers} memory layers")
            out.append(cost if isinstance(cost, list) else [cost] * n_layers)
        return tuple(out)


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
    # Train next-token prediction on text files (training/data.py) instead of the synthetic tasks
    # of `data`, with `tokenizer` (a tokenizer.json; default: init_from's, else the byte tokenizer).
    corpus: CorpusConfig | None = None
    tokenizer: Path | None = None
    # The step's batch is cut into this many micro-batches, each one forward and backward pass; the
    # processes share them (each runs micro_batches / processes, accumulating the gradients). The
    # data and the arithmetic depend on this, not on the number of processes.
    micro_batches: int = Field(1, ge=1)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes (torchrun)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    dist_timeout_s: float = Field(600, gt=0)  # a collective that waits longer ends the job
    log_csv: bool = False  # log.csv beside log.jsonl (rewritten at each checkpoint)
    tensorboard: bool = False  # OUT/tensorboard, if the tensorboard package is installed

    @model_validator(mode="after")
    def _gate_costs_fit(self) -> TrainConfig:
        self.gates.weights(sum(m != "swa" for m in self.model.mixers))
        if self.tokenizer is not None and self.corpus is None:
            raise ValueError("tokenizer is for [corpus] training; the synthetic tasks are byte-level")
        if self.corpus is not None and self.corpus.batch_rows % self.micro_batches:
            raise ValueError(f"corpus.batch_rows {self.corpus.batch_rows} is not a multiple of "
                             f"micro_batches {self.micro_batches}")
        return self

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        text = path.read_text()
        doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls(**doc)
