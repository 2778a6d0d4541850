"""``mimc sparsify MODEL --pattern 2:4 --method magnitude|wanda|sparsegpt|learned -o OUT``.

The learned method trains; its output folder holds a ``checkpoint/`` while it runs, and
``--resume OUT`` continues an interrupted run exactly. Under ``torchrun`` every rank trains on its
shard of the batch and rank 0 writes the artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, console, emit_json, handle_errors


def resolve_run_dir(output: Optional[Path], resume: Optional[Path], default: Path, overwrite: bool) -> Path:
    """The folder a training run writes to; refuses occupied or mismatched folders before any work."""
    from mimc.artifact import check_output, is_artifact
    from mimc.errors import BadInputError
    from mimc.train.checkpoint import has_checkpoint

    if resume is not None:
        if output is not None and Path(output).resolve() != Path(resume).resolve():
            raise BadInputError(f"--resume {resume} continues into its own folder: drop -o {output} or make it the same folder")
        if is_artifact(resume):
            raise BadInputError(f"{resume} is a finished artifact, not an interrupted run: nothing to resume")
        if not has_checkpoint(resume):
            raise BadInputError(f"{resume} holds no training checkpoint: pass the -o folder of an interrupted run")
        return Path(resume)
    out = Path(output) if output is not None else default
    if out.exists() and has_checkpoint(out) and not overwrite:
        raise BadInputError(f"{out} holds an interrupted run's checkpoint: pass --resume {out} to continue, or choose another -o")
    check_output(out, overwrite)
    return out


def merge_resumed(stored: dict[str, Any], given: dict[str, Any], path: str = "") -> dict[str, Any]:
    """The interrupted run's options, refusing command-line options that contradict them."""
    from mimc.errors import BadInputError

    merged = dict(stored)
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, dict):
            merged[key] = merge_resumed(stored.get(key, {}), value, f"{path}{key}.")
            continue
        old = stored.get(key)
        if isinstance(old, list):
            old = tuple(old)
        if old != value:
            raise BadInputError(f"option {path}{key}={value!r} differs from the interrupted run's {old!r}: drop it to resume, or start a fresh run with another -o")
    return merged


def check_resume_source(run_dir: Path, encoder) -> dict[str, Any]:
    """The checkpoint's meta, after checking it was made from this very model."""
    from mimc.artifact import state_hash
    from mimc.errors import BadInputError
    from mimc.train.checkpoint import read_meta

    meta = read_meta(run_dir)
    if meta.get("source_sha256") != state_hash(encoder):
        raise BadInputError(f"resume folder {run_dir} was written for a different model: pass the MODEL the run was started from")
    return meta


def run_training_stage(encoder, config, batches, run_dir: Path | None, resume: bool, checkpoint_every: int,
                       teacher=None):
    """compress() with the runtime options a learning stage reads; rank 0 shows the progress bar."""
    from mimc.compression.registry import compress
    from mimc.train import run_options
    from mimc.train.dist import is_main_process

    with run_options(run_dir=run_dir, resume=resume, checkpoint_every=checkpoint_every,
                     show_progress=is_main_process(), teacher=teacher):
        return compress(encoder, config, batches)


def finish(encoder, out: Path, overwrite: bool, record, json_out: bool, summary: dict[str, Any]) -> None:
    """Rank 0 writes the artifact (replacing the run's checkpoint folder); every rank leaves the group."""
    from mimc.artifact import save_artifact
    from mimc.train.dist import is_main_process, shutdown

    if is_main_process():
        save_artifact(encoder, out, overwrite=overwrite)
        result = {"output": str(out), **summary, "metrics": record.metrics, "seconds": record.seconds}
        if json_out:
            emit_json(result)
        else:
            shown = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float, str))}
            console.print(f"[green]wrote[/] {out}  " + "  ".join(f"{k}={v}" for k, v in shown.items()), highlight=False)
    shutdown()


def register(app: typer.Typer) -> None:
    @app.command("sparsify")
    @handle_errors
    def sparsify(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M pattern along each Linear's input (default 2:4)."),
        method: Optional[str] = typer.Option(None, "--method", help="magnitude (no data), wanda, sparsegpt, or learned (MaskLLM; default magnitude)."),
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration images for wanda/sparsegpt and the learned prior."),
        data: Optional[str] = typer.Option(None, "--data", help="Training images for the learned method (also used as --calib)."),
        n_calib: Optional[int] = typer.Option(None, "--n-calib", help="Calibration images used (default 128)."),
        no_update: bool = typer.Option(False, "--no-update", help="sparsegpt: choose the mask only, keep the weights."),
        weighting: Optional[str] = typer.Option(None, "--weighting", help="Token weights of the wanda/sparsegpt statistics (and learned prior): uniform or rsq."),
        r_min: Optional[float] = typer.Option(None, "--r-min", help="rsq: weight of the least-attended token before the mean-1 rescale (default 1/3)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="learned: training steps (default 300)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="learned: peak learning rate of the mask logits."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="learned: global batch (split over torchrun ranks)."),
        mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="learned: fraction of patches hidden from teacher and student."),
        prior: Optional[str] = typer.Option(None, "--prior", help="learned: one-shot prior (sparsegpt, wanda, magnitude, none)."),
        n: Optional[int] = typer.Option(None, "--n", help="learned: use at most this many training images."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted learned run in this folder."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="learned: steps between checkpoints."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-<N>of<M>)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for everything random (default 0)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Make every block Linear N:M sparse (exact pattern; the manifest records it for TensorRT)."""
        from mimc.compression.nm import NMSparsityConfig, parse_pattern
        from mimc.data import load_images
        from mimc.errors import DataError
        from mimc.models.resolve import load_model
        from mimc.models.resolve import model_slug

        given_learned = {"steps": steps, "lr": lr, "batch_size": batch_size, "mask_ratio": mask_ratio, "prior": prior, "seed": seed}
        given = {"pattern": pattern, "method": method, "n_calib": n_calib, "update_weights": False if no_update else None,
                 "seed": seed, "weighting": weighting, "r_min": r_min, "learned": given_learned}
        if resume is None:
            config = NMSparsityConfig.from_dict({k: v for k, v in given.items() if v is not None and k != "learned"}
                                                | {"learned": {k: v for k, v in given_learned.items() if v is not None}})
        else:
            config = None
        nn_, mm = parse_pattern(pattern or "2:4")
        default_out = Path(f"{model_slug(model)}-{nn_}of{mm}")
        learned = (config.method if config else "learned") == "learned"
        run_dir = resolve_run_dir(output, resume, default_out, overwrite) if learned or resume else None
        out = run_dir if run_dir is not None else (output if output is not None else default_out)
        if run_dir is None:
            resolve_run_dir(out, None, out, overwrite)  # the same occupied-output checks, before any work
        if config is not None and config.needs_data and calib is None and data is None:
            raise DataError(f"method '{config.method}' learns from images: pass --calib DIR or --data DIR (a folder, .npz/.npy or 'builtin')")

        with console.status(f"loading {model}"):
            encoder = load_model(model)
        if resume is not None:
            meta = check_resume_source(resume, encoder)
            config = NMSparsityConfig.from_dict(merge_resumed(meta["stage"], given))
            if calib is None and data is None:
                raise DataError("resuming a learned run needs its images again: pass the same --data DIR")
        images = data if (learned and data is not None) else (calib or data)
        batches = None
        if images is not None:
            limit = n if learned else config.n_calib
            with console.status(f"reading {images}"):
                batches = list(load_images(images, encoder.config, n=limit, seed=config.seed).batches(64))
        sparse, record = run_training_stage(encoder, config, batches, run_dir, resume is not None, checkpoint_every)
        finish(sparse, out, overwrite or run_dir is not None, record, json_out, {"pattern": config.pattern, "method": config.method})
