"""Training over several processes: the process group torchrun describes, DDP or FSDP around the
training objective, and the full (unsharded) states a checkpoint saves.

One process (`atlas train`) is a world of one: no process group, no wrapper, the same code."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Parallel = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start(world: World, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on CUDA) and return this process's device. The
    timeout bounds every collective, so a rank that hangs (not only one that dies, which torchrun
    sees) ends the job instead of stalling it."""
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order (small Python objects: the step's losses, data positions)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


# Submodules of each block that FSDP shards on their own (the big matrices), so that a block's
# weights are gathered only while it runs. The root unit keeps the rest (embedding, norms, the
# memory's gates, feature map and initial weights, which the model reads outside the blocks to make
# the fresh state).
_SHARDED = ("mlp", "mixer.out", "mixer.attn", "mixer.mem.qkv")


def wrap(objective: nn.Module, model: nn.Module, how: Parallel, world: World,
         device: torch.device) -> nn.Module:
    """The module a step calls: `objective` itself in a world of one, else DDP (weights replicated,
    gradients all-reduced) or FSDP (weights, gradients and optimiser state sharded)."""
    if world.size == 1:
        return objective
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = model.get_submodule("blocks")
    assert isinstance(blocks, nn.ModuleList)
    for block in blocks:
        for name in _SHARDED:
            try:
                fully_shard(block.get_submodule(name))
            except AttributeError:  # a block without it (no attention, no memory)
                pass
    fully_shard(objective)
    return objective


@contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally (sync False) or reduce them across ranks
    with the last micro-batch of the step (sync True)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        with nullcontext() if sync else wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
    yield


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_states(wrapped: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's weights (names as `AtlasModel.state_dict()`) and the optimiser's state, whole,
    on the CPU of rank 0 (FSDP gathers the shards; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True)
    weights = get_model_state_dict(wrapped, options=opts)
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    return weights, get_optimizer_state_dict(wrapped, opt, options=opts)


def load_optimizer(wrapped: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A state `full_states` saved, on any number of ranks and either wrapper; or an optimiser's own
    `state_dict()` (runs of earlier versions, one process)."""
    groups = state.get("param_groups") or [{}]
    if all(isinstance(p, int) for p in groups[0].get("params", [0])):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, opt, optim_state_dict=state, options=_options())
