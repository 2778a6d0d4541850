"""The model verbs: prune, width, tokens, sparsify, distill — one stage through the executor.

Each takes a MODEL (``ref``, a path, a hub id, or an Encoder in memory), the stage's options, and
where its images come from; it writes one artifact and returns a :class:`StageReport`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mimc.api.reports import StageReport
from mimc.artifact import recorded_path
from mimc.atomic import check_not_input, check_output, claim_output
from mimc.errors import ConfigError, DataError, NotAModelError, whole
from mimc.options import check_batch_size
from mimc.train.dist import check_one_process


def _load(model):
    """A MODEL argument loaded, an Encoder in memory as it is; anything else refused."""
    from mimc.models.resolve import load_model
    from mimc.models.vit import Encoder

    if isinstance(model, (str, Path)):
        return load_model(model)
    if not isinstance(model, Encoder):
        raise NotAModelError(f"cannot use a {type(model).__name__} as a model: pass an Encoder or a MODEL argument (ref, a path, a hub id)")
    return model


def _name(model, default: str | None = "model") -> str | None:
    """A MODEL argument's name; ``default`` for an Encoder in memory (never its repr)."""
    return str(model) if isinstance(model, (str, Path)) else default


def _default_output(model, suffix: str) -> Path:
    from mimc.models.resolve import model_slug

    return Path(f"{model_slug(_name(model))}-{suffix}")


def run_stage(model, config, output, suffix: str, data=None, n: int | None = None, batch_size: int = 64, seed: int = 0,
              overwrite: bool = False, teacher=None, run=None, preflight=None, encoder=None) -> StageReport:
    """One model stage through the executor into ``output`` (default ``./<model>-<suffix>``)."""
    check_batch_size(batch_size)  # else data fidelity is skipped (-1) or a loop divides by it (0)
    from mimc.data import as_source, spec_of
    from mimc.pipeline.executor import Job, execute
    from mimc.train.dist import is_main_process

    if run is None:  # a one-shot stage: every torchrun rank would compute all of it
        check_one_process(f"mimc {config.name}")
    if config.needs_data and data is None:
        raise DataError(f"stage '{config.name}' with these options needs images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    if config.learns and getattr(data, "skip_corrupt", False):
        raise ConfigError("skip_corrupt does not apply to a learning run (its batches are fixed by its seed): remove the unreadable "
                          "images from data, or drop skip_corrupt", option="skip_corrupt")
    out = Path(output) if output is not None else _default_output(model, suffix)
    check_not_input(out, (model, spec_of(data)))  # never write over, into or around what is read
    if run is None:
        check_output(out, overwrite)
    encoder = encoder if encoder is not None else _load(model)
    if preflight is not None:
        preflight(encoder)
    images = as_source(data, seed)
    if images is not None and images.seed is None:  # the CLI's reading options (--workers) leave the seed to the stage
        images.seed = seed  # else a subset of n images is drawn unseeded: another one every run, and --resume refused
    if images is not None:  # unreadable or mis-shaped images: refused before any work
        if config.learns:
            images.indexed(encoder.config, n).load([0])  # a learning run reads its images a step at a time: never all at once
        else:
            images.draw(encoder.config, n)
    job = Job(source=encoder, stages=[config], images=images, n=n, batch_size=batch_size, teacher=teacher, run=run,
              seed=seed, feed_images=True)
    write = is_main_process()
    result = execute(job, out, overwrite=overwrite or run is not None, write=write)
    stage = result.stages[0]
    return StageReport(out, stage.stage, stage.options, stage.entry, stage.seconds, _name(model), result.encoder, write,
                       list(images.skipped) if images is not None else [])


def prune(model: Any = "ref", output=None, *, data=None, n: int = 256, batch_size: int = 32, seed: int = 0,
          overwrite: bool = False, **options) -> StageReport:
    """Remove transformer blocks (options of :class:`~mimc.compression.blocks.BlockPruningConfig`)."""
    from mimc.compression.blocks import BlockPruningConfig

    config = BlockPruningConfig.from_dict({"seed": seed, **options})  # an unknown option: ConfigError
    _n_needs_data(n, 256, data)
    return run_stage(model, config, output, "pruned", data, n, batch_size, seed, overwrite,
                     preflight=lambda enc: config.num_removed(enc.config.depth, enc.config.kept_block_ids()))


def width(model: Any = "ref", output=None, *, data=None, n: int = 64, seed: int = 0, overwrite: bool = False,
          **options) -> StageReport:
    """Remove MLP neurons and attention heads (:class:`~mimc.compression.width.WidthPruningConfig`)."""
    from mimc.compression.width import WidthPruningConfig

    config = WidthPruningConfig.from_dict(options)
    _n_needs_data(n, 64, data)
    return run_stage(model, config, output, "narrow", data, n, 32, seed, overwrite)


def _n_needs_data(n, default: int, data) -> None:
    """``n`` counts images of ``data``: given without data it would be silently unused."""
    if data is None and n != default:
        raise ConfigError("n counts the images read from data and no data is given: drop n or give data", option=("n", "data"))


def tokens(model: Any, output, *, overwrite: bool = False, **options) -> StageReport:
    """Static token reduction (:class:`~mimc.compression.tokens.TokenReductionConfig`)."""
    from mimc.compression.tokens import TokenReductionConfig

    return run_stage(model, TokenReductionConfig.from_dict(options), output, "tokens", overwrite=overwrite)


def sparsify(model: Any = "ref", output=None, *, calib=None, data=None, n: int | None = None, resume=None,
             checkpoint_every: int | None = None, overwrite: bool = False, seed: int | None = None, learned: dict | None = None,
             workers: int | None = None, fsdp: bool = False, checkpoint_activations: bool = False, **options) -> StageReport:
    """N:M sparsity, one-shot or learned (:class:`~mimc.compression.nm.NMSparsityConfig`); a learned run
    checkpoints into ``output`` and ``resume=OUTPUT`` continues it exactly. ``workers``, ``fsdp`` and
    ``checkpoint_activations``: how a learned run computes (:class:`~mimc.train.TrainRun`); ``checkpoint_every``: steps
    between its checkpoints (default 100)."""
    from mimc.compression.nm import NMSparsityConfig, parse_pattern
    from mimc.train.resume import check_resume_source, merge_resumed, resolve_run_dir

    given_learned = {**(learned or {}), "seed": seed}
    given = {**options, "seed": seed, "learned": given_learned}
    config = None
    if resume is None:
        config = NMSparsityConfig.from_dict({k: v for k, v in given.items() if v is not None and k != "learned"}
                                            | {"learned": {k: v for k, v in given_learned.items() if v is not None}})
    nn_, mm = parse_pattern(options.get("pattern") or "2:4")
    default_out = _default_output(model, f"{nn_}of{mm}")
    is_learned = (config.method if config else "learned") == "learned"
    runtime = {"workers": workers, "fsdp": fsdp, "checkpoint_activations": checkpoint_activations}
    if not is_learned:
        check_one_process(f"mimc sparsify --method {config.method}")
        training = [k for k, v in {**runtime, "checkpoint_every": checkpoint_every}.items() if v not in (None, False)]
        if training:
            names = " and ".join(training)
            raise ConfigError(f"{names} {'apply' if len(training) > 1 else 'applies'} only to a learning run and "
                              f"method {config.method} does not train: drop {names}", option=tuple(training))
        given_only_learned = sorted(k for k, v in (learned or {}).items() if v is not None)
        if given_only_learned:
            raise ConfigError(f"{', '.join(given_only_learned)} only apply to method learned, which trains; method {config.method} is "
                              "one-shot: drop them or choose method learned", option=tuple(given_only_learned))
        if n is not None:  # else ignored: a one-shot method reads n_calib images
            raise ConfigError(f"n counts the training images of method learned; method {config.method} calibrates on n_calib "
                              "images: give n_calib instead", option=("n", "n_calib"))
    elif calib is not None and data is not None:  # else calib is ignored: the prior calibrates on data's first images
        raise DataError("method learned trains on data and calibrates its prior on data's first n_calib images: give data "
                        "alone, or calib alone (it then serves as the training images)", option=("calib", "data"))
    run_dir = resolve_run_dir(output, resume, default_out, overwrite) if is_learned or resume else None
    out = run_dir if run_dir is not None else (Path(output) if output is not None else default_out)
    if run_dir is None:
        resolve_run_dir(out, None, out, overwrite)  # the same occupied-output checks, before any work
    if config is not None and config.needs_data and calib is None and data is None:
        raise DataError(f"method '{config.method}' learns from images: give calib or data (a folder, .npz/.npy or 'builtin')", option=("calib", "data"))
    encoder = _load(model)
    if resume is not None:
        config = NMSparsityConfig.from_dict(merge_resumed(check_resume_source(resume, encoder, NMSparsityConfig, "mimc sparsify")["stage"], given))
        if calib is None and data is None:
            raise DataError("resuming a learned run needs its images again: give the same data", option="data")
    images = data if (is_learned and data is not None) else (calib or data)
    try:
        return _train(model, config, out, images, n if is_learned else config.n_calib, run_dir, resume,
                      100 if checkpoint_every is None else checkpoint_every,
                      runtime, overwrite=overwrite, encoder=encoder)
    except DataError as exc:  # the images came from calib: name it, not data
        if images is calib and calib is not None and "data" in exc.options:
            exc.options = tuple("calib" if o == "data" else o for o in exc.options)
        raise


def distill(model: Any, output=None, *, data=None, teacher=None, n: int | None = None, resume=None,
            checkpoint_every: int = 100, overwrite: bool = False, on_note=None, workers: int | None = None,
            fsdp: bool = False, checkpoint_activations: bool = False, **options) -> StageReport:
    """Recover a pruned model from the dense teacher's features (:class:`~mimc.compression.distill.DistillConfig`);
    the teacher defaults to the source named in the model's manifest. ``workers``, ``fsdp`` and
    ``checkpoint_activations``: how the run computes (:class:`~mimc.train.TrainRun`)."""
    from mimc.compression.distill import DistillConfig, default_teacher
    from mimc.train.engine import supports_masking
    from mimc.train.resume import check_resume_source, merge_resumed, resolve_run_dir

    if data is None:
        raise DataError("distill learns from unlabeled images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    given = dict(options)
    config = DistillConfig.from_dict({k: v for k, v in given.items() if v is not None}) if resume is None else None
    out = resolve_run_dir(output, resume, _default_output(model, "distilled"), overwrite)
    encoder = _load(model)
    teacher_model = _load(teacher) if teacher is not None else default_teacher(encoder)
    if resume is not None:
        config = DistillConfig.from_dict(merge_resumed(check_resume_source(resume, encoder, DistillConfig, "mimc distill")["stage"], given))
    elif given.get("mask_ratio") is None and not (supports_masking(encoder) and supports_masking(teacher_model)):
        if on_note is not None:
            on_note("this model needs every token (relative position bias or a token schedule): training without input masking")
        config = DistillConfig.from_dict({**config.to_dict(), "mask_ratio": 0.0})
    runtime = {"workers": workers, "fsdp": fsdp, "checkpoint_activations": checkpoint_activations}
    report = _train(model, config, out, data, n, out, resume, checkpoint_every, runtime, overwrite=True, teacher=teacher_model,
                    encoder=encoder)
    report.metrics.setdefault("teacher", recorded_path(_name(teacher)) if teacher is not None else (getattr(encoder, "manifest", None).source or {}).get("id"))
    return report


def _train(model, config, out, data, n, run_dir, resume, checkpoint_every: int, runtime: dict[str, Any], **kwargs) -> StageReport:
    """:func:`run_stage` of sparsify / distill: a learned run checkpoints into ``run_dir``."""
    from mimc.train import TrainConfig, TrainRun
    from mimc.train.dist import is_main_process, shutdown
    from mimc.train.parallel import check_run

    if not whole(checkpoint_every) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}", option="checkpoint_every")
    run = None if run_dir is None else TrainRun(run_dir=Path(run_dir), resume=resume is not None,
                                                checkpoint_every=checkpoint_every, show_progress=is_main_process(), **runtime)
    if run is not None:
        # bf16 without a GPU, fsdp in one process: refused before any work
        check_run(config if isinstance(config, TrainConfig) else config.learned, run)
    with claim_output(out) if run is not None and is_main_process() else contextlib.nullcontext():  # one writer per run folder
        report = run_stage(model, config, out, "", data, n, 64, config.seed, run=run, **kwargs)
    shutdown()  # under torchrun every rank leaves the process group (a no-op otherwise)
    return report


__all__ = ["prune", "width", "tokens", "sparsify", "distill", "run_stage"]
