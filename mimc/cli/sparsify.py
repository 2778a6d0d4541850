"""``mimc sparsify MODEL --pattern 2:4 --method magnitude|wanda|sparsegpt|learned -o OUT``.

The learned method trains; its output folder holds a ``checkpoint/`` while it runs, and
``--resume OUT`` continues an interrupted run exactly. Under ``torchrun`` every rank trains on its
shard of the batch and rank 0 writes the artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import (CheckpointActivationsOption, EpochsOption, FsdpOption, JsonOption, ModelArgument,
                             OverwriteOption, PrecisionOption, WorkersOption, handle_errors, reads_images)
from mimc.cli.render import show, stage_line


def register(app: typer.Typer) -> None:
    @app.command("sparsify")
    @handle_errors(flags={"update_weights": "--no-update"})
    @reads_images("calib", "data")
    def sparsify(
        model: str = ModelArgument,
        pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M pattern along each Linear's input (default 2:4)."),
        method: Optional[str] = typer.Option(None, "--method", help="magnitude (no data), wanda, sparsegpt, or learned (MaskLLM; default magnitude)."),
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration images for wanda/sparsegpt (learned: its training images, when --data is not given)."),
        data: Optional[str] = typer.Option(None, "--data", help="Training images for the learned method (also used as --calib)."),
        n_calib: Optional[int] = typer.Option(None, "--n-calib", help="Calibration images used (default 128)."),
        no_update: bool = typer.Option(False, "--no-update", help="sparsegpt: choose the mask only, keep the weights."),
        weighting: Optional[str] = typer.Option(None, "--weighting", help="Token weights of the wanda/sparsegpt statistics (and learned prior): uniform or rsq."),
        r_min: Optional[float] = typer.Option(None, "--r-min", help="rsq: weight of the least-attended token before the mean-1 rescale (default 1/3)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="learned: training steps (default 300)."),
        epochs: Optional[float] = EpochsOption,
        lr: Optional[float] = typer.Option(None, "--lr", help="learned: peak learning rate of the mask logits."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="learned: global batch (split over torchrun ranks)."),
        mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="learned: fraction of patches hidden from teacher and student."),
        prior: Optional[str] = typer.Option(None, "--prior", help="learned: one-shot prior (sparsegpt, wanda, magnitude, none)."),
        n: Optional[int] = typer.Option(None, "--n", "--n-images", help="learned: use at most this many training images (--n-images under torchrun)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted learned run in this folder."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="learned: steps between checkpoints (default 100)."),
        precision: Optional[str] = PrecisionOption,
        workers: Optional[int] = WorkersOption,
        fsdp: bool = FsdpOption,
        checkpoint_activations: bool = CheckpointActivationsOption,
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-<N>of<M>)."),
        overwrite: bool = OverwriteOption,
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for everything random (default 0)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Make every block Linear N:M sparse (exact pattern; the manifest records it for TensorRT)."""
        learned = {"steps": steps, "epochs": epochs, "lr": lr, "batch_size": batch_size, "mask_ratio": mask_ratio, "prior": prior,
                   "precision": precision}
        report = api.sparsify(model, output, calib=calib, data=data, n=n, resume=resume, checkpoint_every=checkpoint_every,
                               overwrite=overwrite, seed=seed, learned=learned, workers=workers, fsdp=fsdp,
                               checkpoint_activations=checkpoint_activations, pattern=pattern, method=method,
                               n_calib=n_calib, update_weights=False if no_update else None, weighting=weighting, r_min=r_min)
        if report.written:  # under torchrun, rank 0 writes and reports
            show(report, json_out, stage_line)
