"""The one executor: an ordered list of stages over in-memory objects, into one artifact.

Model stages (an encoder in, a new encoder out) run first, in memory, through
:func:`mimc.compression.registry.compress`; graph stages (:mod:`mimc.pipeline.graph_stages`) then
write into a temporary folder that becomes the output only when every stage succeeded. The single
commands, ``mimc run`` and ``mimc search`` all run stages through here:

- :func:`execute` — a :class:`Job` into a new artifact folder (``mimc prune``, ``mimc run``, ...);
- :func:`extend` — graph stages added to an existing artifact (``mimc export DIR``, ``mimc quantize DIR``);
- :func:`apply_model_stages` — the model stages alone, in memory (``mimc search`` builds candidates so).

Images enter as one :class:`mimc.data.ImageSource`; the teacher of a learning stage is an explicit
field of the job, never ambient state.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from mimc.artifact import write_artifact
from mimc.atomic import atomic_dir, check_output
from mimc.pipeline.graph_stages import GRAPH_HANDLERS, GraphContext
from mimc.pipeline.recipe import RECIPE_NAME, RUN_REPORT_NAME, Recipe
from mimc.pipeline.stages import is_model_stage


@dataclass
class Job:
    """Everything one execution needs, in memory."""

    source: Any  # the Encoder the stages start from; the dense reference of profile / eval
    stages: Sequence[Any]  # stage configs, model stages first
    images: Any = None  # mimc.data.ImageSource for the stages that need images
    n: int | None = 256  # images a data-driven model stage draws
    batch_size: int = 64  # images per batch handed to a model stage
    teacher: Any = None  # learning stages' teacher (default: ``source``)
    run: Any = None  # mimc.train.config.TrainRun of a learning stage: run folder, resume, progress
    force: bool = False  # keep graphs that fail their fidelity gate
    seed: int = 0
    export_options: dict[str, Any] = field(default_factory=dict)
    feed_images: bool = False  # hand the images to every model stage (its data fidelity), not only to those that need them


@dataclass
class StageResult:
    """One stage as it ran: its options, seconds and what it measured."""

    stage: str
    options: dict[str, Any]
    seconds: float
    entry: dict[str, Any] = field(default_factory=dict)  # metrics (model stage) or graph-stage fields
    record: Any = None  # the StageRecord of a model stage

    def to_dict(self) -> dict[str, Any]:
        body = {"metrics": self.entry} if self.record is not None else {k: v for k, v in self.entry.items() if k != "report"}
        return {"stage": self.stage, "options": self.options, "seconds": self.seconds, **body}


@dataclass
class RunResult:
    output: Path
    encoder: Any
    stages: list[StageResult]
    seconds: float
    report: dict[str, Any] | None = None  # with a recipe: the run report (as written to run.json)


def apply_model_stages(encoder, stages: Sequence[Any], job: Job, on_stage: Callable[[int, Any], None] | None = None,
                       cache: dict | None = None) -> tuple[Any, list[StageResult]]:
    """Run the model stages in order; ``cache`` (keyed by the stage prefix) shares work between calls."""
    from mimc.compression.registry import compress
    from mimc.train.config import TrainRun

    results = []
    for i, config in enumerate(stages, 1):
        if on_stage is not None:
            on_stage(i, config)
        key = tuple(stages[:i])
        if cache is not None and key in cache:
            encoder, record = cache[key]
        else:
            wants = config.needs_data or (job.feed_images and job.images is not None)
            batches = stage_images(job, encoder, config) if wants else None
            # the teacher of a learning stage: the job's, else the dense source the run started from
            run = replace(job.run or TrainRun(), teacher=job.teacher if job.teacher is not None else job.source)
            encoder, record = compress(encoder, config, batches, run=run)
            if cache is not None:
                cache[key] = (encoder, record)
        results.append(StageResult(config.name, config.to_dict(), record.seconds, record.metrics, record))
    return encoder, results


def stage_images(job: Job, encoder, config):
    """What a model stage reads its images from: a learning stage indexed images (it loads one step's
    batch at a time: :class:`mimc.train.images.IndexedImages`), any other a list of batches."""
    if config.learns:
        if job.images.fixed is not None:  # images already in memory (a search's split): indexed as they are
            from mimc.train.images import TensorImages

            return TensorImages(job.images.fixed.pixels)
        return job.images.indexed(encoder.config, job.n)
    return job.images.batches(encoder.config, job.n, job.batch_size)


def execute(job: Job, output: str | Path, overwrite: bool = False, recipe: Recipe | None = None,
            on_stage: Callable[[int, Any], None] | None = None, write: bool = True) -> RunResult:
    """Run every stage of ``job`` and write one artifact at ``output``.

    ``recipe``: also write the resolved recipe (``recipe.yaml``) and the run report (``run.json``)
    beside the weights, as ``mimc run`` does. ``write=False`` (a non-zero torchrun rank) runs the
    stages and writes nothing.
    """
    out = Path(output)
    if write:
        check_output(out, overwrite)
    start = time.perf_counter()
    model_stages = [c for c in job.stages if is_model_stage(c)]
    encoder, results = apply_model_stages(job.source, model_stages, job, on_stage)
    if not write:
        return RunResult(out, encoder, results, round(time.perf_counter() - start, 3))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_artifact(encoder, tmp)
        graph_stages = [c for c in job.stages if not is_model_stage(c)]
        results += extend(tmp, encoder, graph_stages, job.images, job.force, job.seed, job.export_options, on_stage,
                          source=job.source, first_index=len(model_stages) + 1).stages
        seconds = round(time.perf_counter() - start, 3)
        report = _write_run_files(tmp, recipe, results, out, seconds) if recipe is not None else None
    return RunResult(out, encoder, results, seconds, report)


def extend(folder: str | Path, encoder, stages: Sequence[Any], images=None, force: bool = False, seed: int = 0,
           export_options: dict[str, Any] | None = None, on_stage: Callable[[int, Any], None] | None = None,
           source=None, first_index: int = 1) -> RunResult:
    """Add graph stages to an artifact folder (each file written atomically, recorded in its mimc.json);
    ``source``: the dense model profile and eval compare with (default ``encoder``)."""
    folder = Path(folder)
    start = time.perf_counter()
    last = folder / "model.onnx"
    ctx = GraphContext(folder=folder, encoder=encoder, source=encoder if source is None else source, images=images,
                       force=force, seed=seed, export_options=dict(export_options or {}),
                       last_graph=last if last.is_file() else None)
    results = []
    for i, config in enumerate(stages, first_index):
        if on_stage is not None:
            on_stage(i, config)
        stage_start = time.perf_counter()
        entry = GRAPH_HANDLERS[config.name](ctx, config)
        results.append(StageResult(config.name, config.to_dict(), round(time.perf_counter() - stage_start, 3), entry))
    return RunResult(folder, encoder, results, round(time.perf_counter() - start, 3))


def _write_run_files(tmp: Path, recipe: Recipe, results: list[StageResult], out: Path, seconds: float) -> dict:
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "output": str(out), "stages": [r.to_dict() for r in results]}
    if recipe.note:
        report["note"] = recipe.note
    report["seconds"] = seconds
    (tmp / RECIPE_NAME).write_text(replace(recipe, output=None).to_yaml())  # resolved, without the output folder
    (tmp / RUN_REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


__all__ = ["Job", "StageResult", "RunResult", "execute", "extend", "apply_model_stages", "stage_images"]
