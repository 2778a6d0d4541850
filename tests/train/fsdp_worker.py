"""One rank of tests/train/test_ddp.py's FSDP check (``torchrun --nproc-per-node 2 tests/train/fsdp_worker.py OUT``).

Every run here shards the student, teacher and optimizer state over the ranks (``TrainRun(fsdp=True)``):
distillation with activation checkpointing, learned 2:4 masks, an N:M student whose zeros must
survive, and a run killed after step 2 (checkpointed every step) then resumed. Rank 0 writes each
result's weights as OUT/<name>.safetensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mimc.compression.blocks import remove_blocks
from mimc.compression.registry import compress
from mimc.models.vit import build_encoder
from mimc.train import TrainRun
from mimc.train.dist import context, shutdown
from tests.conftest import Interrupt, stop_at, tiny_config


def runs():
    """(name, encoder, stage config, TrainRun options) of every run, shared with the single-process reference."""
    from mimc.compression.distill import DistillConfig
    from mimc.compression.nm import NMSparsityConfig

    teacher = build_encoder(tiny_config(), seed=0)
    sparse, _ = compress(teacher, NMSparsityConfig(method="magnitude"))
    distill = DistillConfig(steps=4, lr=1e-3, batch_size=8, mask_ratio=0.5)
    learned = NMSparsityConfig(method="learned", n_calib=16, learned=dict(steps=4, batch_size=8, mask_ratio=0.5, prior="magnitude"))
    return teacher, [
        ("distill", remove_blocks(teacher, [1]), distill, {"teacher": teacher, "checkpoint_activations": True}),
        ("learned", teacher, learned, {}),
        ("nm_distill", sparse, DistillConfig(steps=3, lr=1e-2, batch_size=8), {"teacher": teacher}),
    ]


def images() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def main(out: Path) -> None:
    ctx = context()
    teacher, jobs = runs()
    results = {}
    for name, encoder, config, options in jobs:
        results[name] = compress(encoder, config, images(), run=TrainRun(fsdp=True, **options))[0]
    _, encoder, config, options = jobs[0]
    try:
        compress(encoder, config, images(), run=TrainRun(fsdp=True, run_dir=out / "run", checkpoint_every=1, on_step=stop_at(2), **options))
    except Interrupt:
        pass
    results["resumed"] = compress(encoder, config, images(), run=TrainRun(fsdp=True, run_dir=out / "run", resume=True, **options))[0]
    if ctx.is_main:
        for name, model in results.items():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
