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

from mimc.cli.common import JsonOption, MODEL_HELP, console, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @handle_errors
    def distill(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: Optional[str] = typer.Option(None, "--data", help="Unlabeled images: a folder, .npy/.npz or 'builtin'."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 1000)."),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="Dense model to learn from (default: the source in MODEL's manifest)."),
        mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="Fraction of patches hidden from both (default 0.75; 0 for models that need every token)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-4)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch, split over torchrun ranks (default 32)."),
        hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help="Also match each kept block's output to its teacher block (default 0: final features only)."),
        n: Optional[int] = typer.Option(None, "--n", help="Use at most this many images from --data."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps between checkpoints."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-distilled)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for everything random (default 0)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Recover a pruned model by distilling the dense teacher's features, without labels."""
        from mimc.compression.distill import DistillConfig, default_teacher
        from mimc.data import load_images
        from mimc.errors import DataError
        from mimc.models.resolve import load_model
        from mimc.train.engine import supports_masking
        from mimc.models.resolve import model_slug
        from mimc.cli.sparsify import check_resume_source, finish, merge_resumed, resolve_run_dir, run_training_stage

        if data is None:
            raise DataError("distill learns from unlabeled images: pass --data DIR (a folder, .npz/.npy or 'builtin')")
        given = {"steps": steps, "lr": lr, "batch_size": batch_size, "mask_ratio": mask_ratio, "hidden_weight": hidden_weight, "seed": seed}
        config = DistillConfig.from_dict({k: v for k, v in given.items() if v is not None}) if resume is None else None
        out = resolve_run_dir(output, resume, Path(f"{model_slug(model)}-distilled"), overwrite)
        with console.status(f"loading {model}"):
            encoder = load_model(model)
        with console.status("loading the teacher"):
            teacher_model = load_model(teacher) if teacher is not None else default_teacher(encoder)
        if resume is not None:
            config = DistillConfig.from_dict(merge_resumed(check_resume_source(resume, encoder)["stage"], given))
        elif mask_ratio is None and not (supports_masking(encoder) and supports_masking(teacher_model)):
            console.print("[yellow]note:[/] this model needs every token (relative position bias or a token schedule): training without input masking")
            config = DistillConfig.from_dict({**config.to_dict(), "mask_ratio": 0.0})
        with console.status(f"reading {data}"):
            batches = list(load_images(data, encoder.config, n=n, seed=config.seed).batches(64))
        student, record = run_training_stage(encoder, config, batches, out, resume is not None, checkpoint_every, teacher=teacher_model)
        finish(student, out, True, record, json_out, {"steps": config.steps, "teacher": teacher or (getattr(encoder, "manifest", None).source or {}).get("id")})
