"""The run folder of a learning stage: refusing occupied or mismatched folders, and resuming exactly."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mimc.artifact import is_artifact, state_hash
from mimc.atomic import check_output
from mimc.errors import BadInputError
from mimc.train.checkpoint import has_checkpoint, read_meta
from mimc.train.config import TrainConfig


def resolve_run_dir(output, resume, default: Path, overwrite: bool) -> Path:
    """The folder a training run writes to; refuses occupied or mismatched folders before any work."""
    if resume is not None:
        if overwrite:  # else silently ignored
            raise BadInputError("resume continues the interrupted run and overwrite starts afresh over it: drop one of them",
                                option=("resume", "overwrite"))
        if output is not None and Path(output).resolve() != Path(resume).resolve():
            raise BadInputError(f"resume {resume} continues into its own folder: drop output {output} or make it the same folder",
                                option=("resume", "output"))
        if is_artifact(resume):
            raise BadInputError(f"{resume} is a finished artifact, not an interrupted run: nothing to resume")
        if not has_checkpoint(resume):
            raise BadInputError(f"{resume} holds no training checkpoint: give resume the output folder of an interrupted run",
                                option=("resume", "output"))
        return Path(resume)
    out = Path(output) if output is not None else default
    if out.exists() and has_checkpoint(out) and not overwrite:
        raise BadInputError(f"{out} holds an interrupted run's checkpoint: give resume {out} to continue, or choose another output",
                            option=("resume", "output"))
    check_output(out, overwrite)
    return out


def merge_resumed(stored: dict[str, Any], given: dict[str, Any], path: str = "") -> dict[str, Any]:
    """The interrupted run's options, refusing given options that contradict them."""
    merged = dict(stored)
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, dict):
            merged[key] = merge_resumed(stored.get(key, {}), value, f"{path}{key}.")
            continue
        if key not in stored and TrainConfig.recorded_when_set.get(key, ...) == value:
            continue  # left unrecorded at its default (precision fp32): given again at that default, it matches
        old = stored.get(key)
        if isinstance(old, list):
            old = tuple(old)
        if old != value:
            was = stored.get(key, TrainConfig.recorded_when_set.get(key))  # unrecorded: its default, or not set at all
            was = f"the interrupted run's {was!r}" if was is not None else "the interrupted run, which did not set it"
            raise BadInputError(f"{key} {value!r} differs from {was}: drop {key} to resume, "
                                "or start a fresh run with another output", option=(key, "output"))
    return merged


def check_resume_source(run_dir: Path, encoder, config_type=None, command: str = "") -> dict[str, Any]:
    """The checkpoint's meta, after checking it was made from this very model (and, given ``config_type``, by
    the stage whose options it holds: ``command`` names that stage's command)."""
    meta = read_meta(run_dir)
    if config_type is not None:
        stored = meta.get("stage")
        if not isinstance(stored, dict) or not set(stored) <= {f.name for f in dataclasses.fields(config_type)}:
            raise BadInputError(f"resume folder {run_dir} holds an interrupted run of another command, not of {command}: resume it "
                                "with the command that started it (mimc distill, or mimc sparsify --method learned)")
    if meta.get("source_sha256") != state_hash(encoder):
        raise BadInputError(f"resume folder {run_dir} was written for a different model: pass the MODEL the run was started from")
    return meta
