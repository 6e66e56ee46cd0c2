"""The training objective: next-token loss through the chunk recurrence (autograd flows through
every memory update), the synthetic tasks' answer loss, and the costs on the memory's gates
(`[gates]`, training/config.py), as one module (`Objective`) that DDP and FSDP can wrap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas.engine.model import AtlasModel

from .config import GateConfig, TrainConfig


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


def task_loss(model: AtlasModel, tokens: Tensor, answer_mask: Tensor, prompt_mask: Tensor,
              lm_weight: float, gates: GateConfig | None = None, end_mask: Tensor | None = None,
              end_weight: float = 1.0, quiet: Tensor | None = None, facts: Tensor | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean cross-entropy of the answers (the bytes of end_mask weighing end_weight, the others
    1), plus lm_weight times that of the prompt's next tokens, plus the gate costs; and its parts by
    name (answer: the plain mean, prompt, end: the mean over end_mask, and with memory layers the
    mean write gate `eta` (/ eta_max), forgetting `forget` (1 - alpha) and momentum gate `theta.i`
    of the prompt's chunks; with `quiet` (TaskBatch.quiet), `quiet.i` the mean write gate on the
    chunks that hold no fact; with `facts` (TaskBatch.facts), `fact.i` that on the chunks that hold
    part of one)."""
    logits, logged = _forward_logging_gates(model, tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(answer_mask.float())
    parts = {"answer": ce[answer_mask].mean(), "prompt": ce[prompt_mask].mean()}
    answer = parts["answer"]
    if end_mask is not None and end_mask.any():
        parts["end"] = ce[end_mask].mean()
        weight = answer_mask.float() + (end_weight - 1) * end_mask.float()
        answer = (ce * weight).sum() / weight.sum().clamp_min(1e-9)
    quiet_chunks = fact_chunks = None
    if logged:
        n, size = logged[0].shape[0], model.cfg.chunk_size
        by_chunk = lambda mask: mask[:, :n * size].reshape(mask.shape[0], n, size)  # noqa: E731
        quiet_chunks = None if quiet is None else by_chunk(quiet).all(-1).T  # (chunks, B)
        fact_chunks = None if facts is None else by_chunk(facts).any(-1).T
    gate_parts, costs = _gate_terms(logged, gates, quiet_chunks, fact_chunks)
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


def _gate_terms(logged: list[Tensor], gates: GateConfig | None, quiet: Tensor | None = None,
                facts: Tensor | None = None) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The gates' means (write `eta`, forgetting `forget`, by layer `eta.i`, `theta.i`; with quiet
    (chunks, B): the chunks that hold no fact, `quiet.i`; with facts (chunks, B): those that hold
    part of one, `fact.i`) and the costs of `gates` on them (GateConfig: writing, forgetting, the
    momentum's span, writing where there is no fact, not writing where there is one)."""
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
    fact_eta = None
    if facts is not None and bool(facts.any()):
        fact_eta = eta[:, facts]  # (layers, fact chunks of every prompt, H)
        parts.update({f"fact.{i}": e.mean() for i, e in enumerate(fact_eta)})
    if gates is None:
        return parts, []
    write_w, forget_w, momentum_w, quiet_w, fact_w = (torch.tensor(w, device=g.device)
                                                      for w in gates.weights(len(g)))
    over_horizon = lambda x: torch.log1p(gates.horizon_chunks * x).flatten(1).mean(1)  # noqa: E731
    span = -torch.log1p(-theta.clamp_max(1 - 1e-7)).flatten(1).mean(1)  # log of 1 / (1 - theta)
    costs = [(write_w * over_horizon(eta)).mean(), (forget_w * over_horizon(forget)).mean(),
             (momentum_w * span).mean()]
    if quiet_eta is not None:
        costs.append((quiet_w * over_horizon(quiet_eta)).mean())
    if fact_eta is not None:  # the logistic loss of the gate's logit: it does not vanish when shut
        costs.append((fact_w * -torch.log(fact_eta.clamp_min(1e-6)).flatten(1).mean(1)).mean())
    return parts, costs


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
                             batch["quiet"], batch["facts"])
        return text_loss(self.model, batch["tokens"], self.gates)


#: Parts of the loss the log names `NAME_loss`; the others are the gates' means, `mean_NAME`.
LOSS_PARTS = ("answer", "prompt", "end", "lm")
