"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a folder ``<run dir>/checkpoint/`` written atomically (a crash mid-write keeps the
previous one) holding:

- ``trainable.safetensors``: the tensors being learned,
- ``optimizer.pt``: the optimizer's state dict (plain tensors and numbers; read back with
  ``torch.load(weights_only=True)``),
- ``state.json``: the step, the RNG state, and ``meta`` — what the run was started from (stage
  options, content hashes of the source model and of the data, world size). Resuming compares
  ``meta`` and refuses a folder written for another model, data or options.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimc.artifact import atomic_dir
from mimc.errors import BadInputError

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "state.json"
TENSORS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng_state: torch.Tensor
    meta: dict[str, Any]
    losses: list[float]


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def has_checkpoint(run_dir: str | Path) -> bool:
    return (checkpoint_path(run_dir) / STATE_NAME).is_file()


def save_checkpoint(run_dir: str | Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    meta: dict[str, Any], losses: list[float]) -> Path:
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(run_dir)
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TENSORS_NAME))
        torch.save(optimizer, tmp / OPTIMIZER_NAME)
        state = {
            "step": step,
            "rng_state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "meta": meta,
            "losses": losses,
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    return target


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The ``meta`` of a run folder's checkpoint (what it was started from)."""
    path = checkpoint_path(run_dir) / STATE_NAME
    if not path.is_file():
        raise BadInputError(f"{run_dir} holds no training checkpoint ({CHECKPOINT_DIR}/{STATE_NAME}): pass the -o folder of an interrupted run")
    try:
        return json.loads(path.read_text())["meta"]
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path} is not a readable mimc checkpoint ({exc}): start a fresh run with another -o") from None


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    from safetensors.torch import load_file

    folder = checkpoint_path(run_dir)
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        trainable = load_file(str(folder / TENSORS_NAME))
        optimizer = torch.load(folder / OPTIMIZER_NAME, weights_only=True, map_location="cpu")
        rng = torch.frombuffer(bytearray(base64.b64decode(state["rng_state"])), dtype=torch.uint8).clone()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BadInputError(f"{folder} is not a readable mimc checkpoint ({exc}): start a fresh run with another -o") from None
    return Checkpoint(int(state["step"]), trainable, optimizer, rng, state["meta"], list(state.get("losses", [])))


def meta_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's meta and this run's (JSON-normalised)."""
    a = json.loads(json.dumps(saved, sort_keys=True, default=str))
    b = json.loads(json.dumps(current, sort_keys=True, default=str))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_meta(run_dir: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diff = meta_differences(saved, current)
    if not diff:
        return
    if "source_sha256" in diff:
        what = "a different model"
    elif "data_sha256" in diff:
        what = "different data"
    else:
        what = f"different options ({', '.join(diff)})"
    raise BadInputError(f"resume folder {run_dir} was written for {what}: pass the same MODEL, data and options, or start a fresh run with another -o")
