"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a folder ``<run dir>/checkpoint/`` written atomically (a crash mid-write keeps the
previous one) holding:

- ``trainable.safetensors``: the tensors being learned,
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state dict, its tensors and the
  structure around them (numbers, lists, keys) apart, so that reading it back never unpickles
  anything (a checkpoint of an older mimc with a pickled ``optimizer.pt`` is refused),
- ``state.json``: the step, the global RNG state (recorded; a resume never sets it: every draw of a run
  comes from its own seeded generators), and ``meta`` — what the run was started from (stage
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mimc.atomic import atomic_dir
from mimc.errors import BadInputError, clip, shorten

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "state.json"
TENSORS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_LAYOUT = "optimizer.json"
LEGACY_OPTIMIZER = "optimizer.pt"


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
                    meta: dict[str, Any], losses: list[float]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_dir(checkpoint_path(run_dir), overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TENSORS_NAME))
        tensors: dict[str, torch.Tensor] = {}
        layout = _split(optimizer, tensors)
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        (tmp / OPTIMIZER_LAYOUT).write_text(json.dumps(layout) + "\n")
        state = {
            "step": step,
            "rng_state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "meta": meta,
            "losses": losses,
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The ``meta`` of a run folder's checkpoint (what it was started from)."""
    path = checkpoint_path(run_dir) / STATE_NAME
    if not path.is_file():
        raise BadInputError(f"{run_dir} holds no training checkpoint ({CHECKPOINT_DIR}/{STATE_NAME}): pass the -o folder of an interrupted run")
    try:
        meta = json.loads(path.read_text())["meta"]
        if not isinstance(meta, dict):
            raise ValueError("meta is not a mapping")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{path} is not a readable mimc checkpoint ({shorten(exc)}): start a fresh run with another -o") from None


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The checkpoint of ``run_dir``, every part checked; nothing in it is unpickled."""
    folder = checkpoint_path(run_dir)
    if (folder / LEGACY_OPTIMIZER).exists() and not (folder / OPTIMIZER_NAME).exists():
        raise BadInputError(f"{folder / LEGACY_OPTIMIZER} is a pickle (a checkpoint of an older mimc), which mimc never loads: "
                            "start a fresh run with another -o")
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        trainable = load_file(str(folder / TENSORS_NAME))
        tensors = load_file(str(folder / OPTIMIZER_NAME))
        optimizer = _join(json.loads((folder / OPTIMIZER_LAYOUT).read_text()), tensors)
        rng = torch.frombuffer(bytearray(base64.b64decode(state["rng_state"], validate=True)), dtype=torch.uint8).clone()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise BadInputError(f"{folder} is not a readable mimc checkpoint ({shorten(exc)}): start a fresh run with another -o") from None
    step, losses = state.get("step"), state.get("losses", [])
    problem = None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problem = f"step {clip(step)} is not a whole number >= 0"
    elif not isinstance(losses, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses):
        problem = "losses is not a list of numbers"
    elif len(losses) != step:
        problem = f"step {step} disagrees with its {len(losses)} recorded losses"
    elif rng.numel() != torch.get_rng_state().numel():
        problem = f"rng_state holds {rng.numel()} bytes, not {torch.get_rng_state().numel()}"
    elif not isinstance(state.get("meta"), dict):
        problem = "meta is not a mapping"
    elif not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)):
        problem = "the optimizer state is not an optimizer's state dict"
    if problem:
        raise BadInputError(f"{folder / STATE_NAME} is not a valid mimc checkpoint ({problem}): start a fresh run with another -o")
    return Checkpoint(step, trainable, optimizer, rng, state["meta"], [float(v) for v in losses])


def _split(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict as JSON, each tensor replaced by the name it is stored under in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[_split(k, tensors), _split(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_split(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _join(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("malformed optimizer.json")
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_join(k, tensors): _join(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_join(v, tensors) for v in value]
        return tuple(items) if kind == "tuple" else items
    if kind == "value" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    raise ValueError("malformed optimizer.json")


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
