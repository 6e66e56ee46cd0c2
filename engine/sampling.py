"""Sampling: greedy, temperature, min-p, top-k, top-p, penalties, logit bias, seeds, stop strings,
max tokens, and the log-probabilities of tokens.

One choice's token is drawn in this order (vLLM's): logits -> logit bias -> repetition penalty ->
presence and frequency penalties -> greedy argmax, or temperature -> min-p -> top-k -> top-p -> a
draw from the choice's generator. Log-probabilities (`logprobs_of`) are always those of the model's
own distribution: log_softmax of the raw logits, before any of these steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from .state import StateFormatError

#: The most alternatives a token's log-probability entry lists (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Seeds are taken modulo this (torch generators take 64-bit seeds; choice i uses seed + i).
_SEED_MOD = 1 << 64


class SamplingParams(BaseModel):
    """How to sample, for every choice of a request (the one definition the engine, the runtime and
    the server's request bodies map to)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)  # 0 means greedy
    top_k: int = Field(0, ge=0)  # 0 means no limit
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # drop tokens below min_p * the top token's probability
    seed: int | None = None  # choice i draws from a generator seeded with seed + i
    stop: list[str] = Field(default_factory=list)
    # OpenAI's penalties: over the tokens this choice generated (counts and presence).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM's / Hugging Face's: over the prompt's and the generated tokens; positive logits are
    # divided by it, negative ones multiplied. 1 means none; at most ten times either way (a logit
    # divided by 1e-39 overflows, and the non-finite result would look like a corrupt state).
    repetition_penalty: float = Field(1.0, ge=0.1, le=10.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit
    n: int = Field(1, ge=1, le=128)  # choices, forks of the one prompt state
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # per sampled token, with N alternatives
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # per prompt token, likewise

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: object) -> object:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        for tok, bias in v.items():
            if tok < 0:
                raise ValueError(f"logit_bias: token id {tok} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: {bias} for token {tok} is outside [-100, 100]")
        return v

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow: the distribution is the argmax anyway.
        return self.temperature < 1e-6 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the logits change with what was read or generated (or by a fixed bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def generator(self, device: torch.device | str = "cpu", index: int = 0) -> torch.Generator | None:
        """The generator of choice `index` (seed + index), None without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed((self.seed + index) % _SEED_MOD)


# -- log-probabilities --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model, with the `top` most likely tokens of that
    position (id, log-probability), most likely first."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: Tensor, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Entries for `ids[i]` under `logits[i]` (T, V): log_softmax of the raw logits in float32."""
    if not len(ids):
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, idx[:, None])[:, 0].tolist()
    if top:
        values, indices = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)  # sorted, descending
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), tp) for t, c, tp in zip(ids, chosen, tops, strict=True)]


# -- drawing a token ------------------------------------------------------------------------------------

def check_finite(logits: Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise StateFormatError("the session's logits hold non-finite values: its state is corrupt")


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then min-p and top-k as -inf masks (float32 logits in, scaled logits out)."""
    logits = logits / params.temperature
    if params.min_p > 0.0:
        # p_i < min_p * p_max  <=>  l_i < l_max + log(min_p): no softmax needed
        logits = logits.masked_fill(logits < logits.max() + math.log(params.min_p), float("-inf"))
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token from logits (V,) (penalties already applied: `Sampler`). Non-finite logits (a
    corrupt state's) raise StateFormatError."""
    logits = logits.float()
    check_finite(logits)
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(warp(logits, params), dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
        drop[0] = False  # also when top_p underflows to 0 in float32
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class Sampler:
    """The sampling state of one choice: its generator (seed + index), the counts of the tokens it
    generated (presence and frequency penalties) and the tokens its prompt and answer hold
    (repetition penalty)."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu",
                 prompt: Sequence[int] = (), index: int = 0) -> None:
        self.params = params
        self.generator = params.generator(device, index)
        self.counts: Tensor | None = None
        self.seen: Tensor | None = None
        self.bias: Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if len(prompt):
                self.seen[torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        if params.logit_bias:
            if max(params.logit_bias) >= vocab_size:
                raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is outside the "
                                 f"vocabulary of {vocab_size}")
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            ids = torch.as_tensor(list(params.logit_bias), dtype=torch.long, device=device)
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
            self.bias[ids] = values

    def process(self, logits: Tensor) -> Tensor:
        """The logits after the bias and the penalties (float32)."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            r = self.params.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if self.counts is not None:
            p = self.params
            present = (self.counts > 0).float()
            logits = logits - self.counts * p.frequency_penalty - present * p.presence_penalty
        return logits

    def observe(self, token: int) -> None:
        """A token this choice generated."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def sample(self, logits: Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from the model's logits (V,), and its log-probability entry when the
        params ask for one (of the raw logits, before bias, penalties and temperature)."""
        logits = logits.float()
        check_finite(logits)
        processed = self.process(logits) if self.params.penalized else logits
        tok = sample(processed, self.params, self.generator)
        self.observe(tok)
        top = self.params.logprobs
        return tok, (logprobs_of(logits[None], [tok], top)[0] if top is not None else None)


class StopMatcher:
    """Watches streamed text for stop strings. Text that could still become a stop string is held
    back until it cannot; the stop string itself is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)[0]]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out
