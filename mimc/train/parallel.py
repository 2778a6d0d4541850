"""How a learning run spreads over ranks and saves memory: DDP (the default under torchrun) or FSDP2
(``TrainRun.fsdp``), activation checkpointing, bf16 — README.md, "Learning across processes and nodes",
says what each does and why bf16 is refused on CPU.

FSDP2 shards a copy of the student (and of the teacher): the caller's student stays a plain module,
and the learned values are copied back into it at the end. A checkpoint gathers the full tensors
(every rank takes part, rank 0 writes), in a DDP or single-process run's format.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch
from torch import nn

from mimc.errors import ConfigError
from mimc.train.dist import check_divisible


def check_run(config, run) -> None:
    """Refuse runtime options this process cannot honour, before any work."""
    if config.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("precision bf16 autocasts on CUDA and this machine has no GPU: drop precision bf16 (CPU runs train in fp32)",
                          option="precision")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_divisible(config.batch_size, world)  # else found only once the stage has begun (after a learned run's prior)
    if run.fsdp and world < 2:
        raise ConfigError("fsdp shards over torchrun processes and this run is one process: launch with torchrun --nproc-per-node K "
                          "(K >= 2), or drop fsdp", option="fsdp")


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _checkpointed(fn, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed_blocks(encoder: nn.Module) -> Iterator[None]:
    """Every block's ``forward`` and ``forward_tokens`` under activation checkpointing, while inside.

    The methods are overridden on the block instances (names and state dicts unchanged, so FSDP and
    checkpoints see the same parameters) and restored on the way out.
    """
    patched = []
    try:
        for block in encoder.blocks:
            for name in ("forward", "forward_tokens"):
                setattr(block, name, functools.partial(_checkpointed, getattr(block, name)))
                patched.append((block, name))
        yield
    finally:
        for block, name in patched:
            delattr(block, name)  # the instance attribute goes: the class's method again


def shard(model: nn.Module, encoder: nn.Module, world_size: int, device: torch.device) -> None:
    """FSDP2 over every rank: each of ``encoder``'s blocks, then ``model`` (the root that is called)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in encoder.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full(obj: Any, sharded: bool) -> Any:
    """``obj`` (a tensor, or a state dict of them) with every sharded tensor gathered whole, on the CPU.

    A collective under FSDP: every rank must call it, in the same order.
    """
    if not sharded:
        return obj
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: full(v, sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full(v, sharded) for v in obj)
    return obj


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut as ``like`` is (this rank's shard of a DTensor), on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        # every rank holds the same whole tensor: each keeps its own chunk, nothing is sent
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return tensor.to(like.device)


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state dict (as checkpoints hold it) cut as the optimizer's sharded parameters are."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, entry in state["state"].items():
        param = order[int(index)]
        out[index] = {k: shard_like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape and v.ndim else v
                      for k, v in entry.items()}
    return {**state, "state": out}


__all__ = ["check_run", "autocast", "checkpointed_blocks", "shard", "full", "shard_like",
           "shard_optimizer_state"]
