"""The artifact directory: ``model.safetensors`` + ``mimc.json`` (config, source, lineage).

Every write is atomic: files go to a temporary sibling and are renamed into place, so a crash
leaves either the old state or the new one, never half of each. Inputs are never modified.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mimc.errors import BadInputError, NotAModelError

FORMAT_VERSION = 1
MANIFEST_NAME = "mimc.json"
WEIGHTS_NAME = "model.safetensors"


def mimc_version() -> str:
    from mimc._version import __version__

    return __version__


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class StageRecord:
    """One applied stage: what ran, with which options, what it measured, and from which parent."""

    name: str
    config: dict[str, Any]
    config_version: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    parent_hash: str | None = None
    mimc_version: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        self.mimc_version = self.mimc_version or mimc_version()
        self.created = self.created or now_iso()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageRecord":
        return cls(**data)


@dataclass
class Manifest:
    """The contents of ``mimc.json``."""

    encoder: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # id, family, sha256 of what was loaded
    stages: list[StageRecord] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # exports beside the weights
    weights_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise NotAModelError(
                f"mimc.json has format_version {version!r}, this mimc reads {FORMAT_VERSION}: re-create the artifact with this mimc"
            )
        data = dict(data)
        data["stages"] = [StageRecord.from_dict(s) for s in data.get("stages", [])]
        return cls(**data)

    def with_stage(self, record: StageRecord, encoder: dict[str, Any]) -> "Manifest":
        """A new manifest one stage further along (files written for the parent do not carry over)."""
        return Manifest(encoder=encoder, source=dict(self.source), stages=[*self.stages, record])


# Hashing ------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_hash(module: torch.nn.Module) -> str:
    """A content hash of a module's tensors (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Atomic writes ------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give outputs the permissions a plain write would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"output folder {path.parent} does not exist: create it or choose another output path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_mode(tmp_path, directory=False)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an occupied output directory; commands call it before any work, atomic_dir again at the end."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise BadInputError(f"{path} already exists and is not empty: choose another output or allow overwrite", option=("output", "overwrite"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``path`` on success.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is swapped out only after
    the new contents are complete.
    """
    path = Path(path)
    check_output(path, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        _default_mode(tmp, directory=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Save / load --------------------------------------------------------------------------------------
def save_artifact(encoder, out_dir: str | os.PathLike, manifest: Manifest | None = None, overwrite: bool = False) -> Path:
    """Write ``encoder`` (and its manifest) as an artifact directory; returns the directory."""
    from safetensors.torch import save_file

    manifest = manifest or getattr(encoder, "manifest", None) or Manifest(encoder=encoder.config.to_dict())
    manifest.encoder = encoder.config.to_dict()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        # One metadata key only: safetensors writes its metadata map in hash order, which changes from
        # process to process, and the same weights must give the same bytes (weights_sha256, replay).
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        manifest.weights_sha256 = sha256_file(tmp / WEIGHTS_NAME)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    encoder.manifest = manifest
    return out_dir


def is_artifact(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    try:
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAModelError(f"{path / MANIFEST_NAME} is not readable JSON ({exc}): re-create the artifact") from exc
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:
        raise NotAModelError(f"{path / MANIFEST_NAME} is not a mimc manifest ({exc}): re-create the artifact") from exc
