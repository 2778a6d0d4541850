"""The ranks of a torchrun job, for verbs that split their images over processes (embed, eval).

Every rank makes the same calls in the same order. :meth:`Ranks.agree` is where ranks meet: each
says whether it failed, and when any did every rank raises that failure (with its exit code and
options, so the CLI still names the right flag) instead of waiting for the failed one forever.
:meth:`Ranks.collect` brings every rank's payload to rank 0, and :meth:`Ranks.outcome` hands rank 0's result (or failure) to every rank.
"""
from __future__ import annotations

from typing import Any

import torch

from mimc.errors import BadInputError, MimcError


class Ranks:
    """An initialised torch.distributed process group of ``world`` ranks, seen from ``rank``."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()):
            raise MimcError("gather needs an initialised torch.distributed process group: run under torchrun")
        if tdist.get_world_size() != world or tdist.get_rank() != rank:
            raise MimcError(f"rank {rank} of {world} does not match the process group "
                            f"(rank {tdist.get_rank()} of {tdist.get_world_size()})")
        self.tdist, self.rank, self.world = tdist, rank, world
        self.nccl = tdist.get_backend() == "nccl"

    def agree(self, error: MimcError | None, payload: Any = None) -> list[Any]:
        """Every rank's payload; when any rank failed, every rank raises the first failure."""
        gathered: list[Any] = [None] * self.world
        self.tdist.all_gather_object(gathered, (_status(error), payload))
        if error is not None:
            error.agreed = True
            raise error
        for r, (failed, _) in enumerate(gathered):
            if failed is not None:
                raise _remote_error(r, failed)
        return [payload for _, payload in gathered]

    def collect(self, payload: Any) -> list[Any] | None:
        """Rank 0: every rank's payload in rank order; other ranks: None (call after :meth:`agree`)."""
        got: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self.tdist.gather_object(payload, got, dst=0)
        return got

    def wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend sends from (nccl: the GPU)."""
        return t.cuda() if self.nccl else t

    def outcome(self, body: Any, error: MimcError | None) -> Any:
        """Rank 0's result (or its failure) on every rank."""
        box = [(body, _status(error))]
        self.tdist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        got, failed = box[0]
        if failed is not None:
            raise _remote_error(0, failed)
        return got


def _status(error: MimcError | None) -> dict[str, Any] | None:
    """What a rank tells the others of its failure (None: it did not fail)."""
    return {"error": str(error), "exit_code": error.exit_code, "options": list(error.options)} if error else None


def _remote_error(rank: int, status: dict[str, Any]) -> MimcError:
    """Another rank's failure, raised here with its exit code and options (so the CLI names its flags)."""
    kind = BadInputError if status["exit_code"] == 2 else MimcError
    error = kind(f"rank {rank}: {status['error']}", option=status["options"])
    error.agreed = True  # every rank knows already: nothing more to tell the others
    return error


__all__ = ["Ranks"]
