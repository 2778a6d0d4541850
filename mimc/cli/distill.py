"""``mimc distill MODEL --data DIR --steps N [--teacher SRC] [--mask-ratio 0.75] -o OUT``.

Recovery after block or token pruning: the student learns the dense teacher's features on
unlabeled images. The teacher defaults to the source the model's manifest names. Interrupted runs
continue exactly with ``--resume OUT``; ``torchrun --nproc-per-node K -m mimc distill ...`` splits each
batch over K processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import (CheckpointActivationsOption, EpochsOption, FsdpOption, JsonOption, MODEL_HELP,
                             OverwriteOption, PrecisionOption, WorkersOption, handle_errors, reads_images)
from mimc.cli.render import note, show, stage_line


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @handle_errors
    @reads_images()
    def distill(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: Optional[str] = typer.Option(None, "--data", help="Unlabeled images: a folder, .npy/.npz or 'builtin'."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 1000)."),
        epochs: Optional[float] = EpochsOption,
        teacher: Optional[str] = typer.Option(None, "--teacher", help="Dense model to learn from (default: the source in MODEL's manifest)."),
        mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="Fraction of patches hidden from both (default 0.75; 0 for models that need every token)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-4)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch, split over torchrun ranks (default 32)."),
        hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help="Also match each kept block's output to its teacher block (default 0: final features only)."),
        n: Optional[int] = typer.Option(None, "--n", "--n-images", help="Use at most this many images from --data (--n-images under torchrun, which takes --n as its own)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps between checkpoints."),
        precision: Optional[str] = PrecisionOption,
        workers: Optional[int] = WorkersOption,
        fsdp: bool = FsdpOption,
        checkpoint_activations: bool = CheckpointActivationsOption,
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-distilled)."),
        overwrite: bool = OverwriteOption,
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for everything random (default 0)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Recover a pruned model by distilling the dense teacher's features, without labels."""
        report = api.distill(model, output, data=data, teacher=teacher, n=n, resume=resume, checkpoint_every=checkpoint_every,
                              overwrite=overwrite, on_note=note, workers=workers, fsdp=fsdp,
                              checkpoint_activations=checkpoint_activations, steps=steps, epochs=epochs, lr=lr,
                              batch_size=batch_size, mask_ratio=mask_ratio, hidden_weight=hidden_weight, seed=seed,
                              precision=precision)
        if report.written:  # under torchrun, rank 0 writes and reports
            show(report, json_out, stage_line)
