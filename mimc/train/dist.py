"""Multi-process training through torchrun: one process per rank, each with a shard of the batch.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; without them everything runs in one process. CPU ranks
talk over gloo, GPU ranks over nccl. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from mimc.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, global_batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch (the sizes must divide evenly)."""
        per = global_batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t) / self.world_size


def context() -> DistContext:
    """The current process's place in a torchrun job, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return DistContext(world, rank, local_rank, device)


def check_one_process(command: str, what: str | None = None) -> None:
    """``command`` runs whole in one process: under torchrun every rank would do all of its work and write its
    output, so it is refused before any work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"{what or command} runs in one process and torchrun started {world}: run {command} without torchrun "
                          "(torchrun spreads only mimc sparsify --method learned, distill, embed and eval)")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_divisible(global_batch_size: int, world_size: int) -> None:
    if global_batch_size % world_size:
        raise ConfigError(
            f"batch_size {global_batch_size} does not split evenly over {world_size} processes: choose a multiple of {world_size}",
            option="batch_size",
        )


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
