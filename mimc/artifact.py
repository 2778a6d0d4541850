"""The artifact directory: ``model.safetensors`` + ``mimc.json`` (config, source, lineage).

Every write is atomic (:mod:`mimc.atomic`): a crash leaves either the old state or the new one,
never half of each. Inputs are never modified.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from mimc._version import __version__
from mimc.atomic import atomic_dir, default_mode, write_json
from mimc.errors import NotAModelError, clip, shorten

FORMAT_VERSION = 2  # 2: manifest_sha256
MANIFEST_NAME = "mimc.json"
WEIGHTS_NAME = "model.safetensors"
MAX_MANIFEST_BYTES = 16 << 20


def mimc_version() -> str:
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


@dataclass
class Manifest:
    """The contents of ``mimc.json``."""

    encoder: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # id, family, sha256 of what was loaded
    stages: list[StageRecord] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # exports beside the weights
    weights_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    manifest_sha256: str | None = None  # of all the above: an edited config or stage would load the same weights

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # the stages too: asdict recurses into lists of dataclasses
        data["manifest_sha256"] = manifest_sha256(data)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        data["stages"] = [StageRecord(**s) for s in data.get("stages", [])]
        return cls(**data)

    def with_stage(self, record: StageRecord, encoder: dict[str, Any]) -> "Manifest":
        """A new manifest one stage further along (files written for the parent do not carry over)."""
        return Manifest(encoder=encoder, source=dict(self.source), stages=[*self.stages, record])


def recorded_path(spec: str | None) -> str | None:
    """A model or data argument as an artifact records it: a local path absolute, so that a replay finds
    it from any folder (a WebDataset pattern ``shards/train-{000..009}.tar`` too: a hub id has no brace);
    ``ref``, ``builtin``, hub ids and ``random:`` models as given."""
    if spec in (None, "ref", "builtin") or not str(spec).strip() or not (Path(spec).expanduser().exists() or "{" in spec):
        return spec
    return str(Path(spec).expanduser().resolve())


# Hashing ------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(data: dict[str, Any]) -> str:
    """The sha256 of a manifest's canonical JSON (sorted keys), leaving out its own manifest_sha256."""
    rest = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def state_hash(module: torch.nn.Module) -> str:
    """A content hash of a module's tensors (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Save / load --------------------------------------------------------------------------------------
def save_artifact(encoder, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``encoder`` (and its manifest) as an artifact directory; returns the directory."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_artifact(encoder, tmp)
    return out_dir


def write_artifact(encoder, folder: Path) -> None:
    """Write the weights and manifest into ``folder``, a writer's own temporary folder (nothing else
    writes there, so no temporary of a temporary is made: a killed writer's are all swept as OUT's)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    manifest = getattr(encoder, "manifest", None) or Manifest(encoder=encoder.config.to_dict())
    manifest.encoder = encoder.config.to_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # One metadata key only: safetensors writes its metadata map in hash order, which changes from
    # process to process, and the same weights must give the same bytes (weights_sha256, replay).
    try:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    except SafetensorError as exc:  # an I/O error it keeps only in its text: the OSError it was
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(folder / WEIGHTS_NAME)) if code else exc
    default_mode(folder / WEIGHTS_NAME, directory=False)  # safetensors creates it 0600
    manifest.weights_sha256 = sha256_file(folder / WEIGHTS_NAME)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    encoder.manifest = manifest


def is_artifact(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    where = path / MANIFEST_NAME
    try:
        if where.stat().st_size > MAX_MANIFEST_BYTES:  # a few KiB as mimc writes it: never read a huge one whole
            raise NotAModelError(f"{where} is over {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest mimc wrote: re-create the artifact")
        data = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAModelError(f"{where} is not readable JSON ({shorten(exc)}): re-create the artifact") from exc
    if not isinstance(data, dict):
        raise NotAModelError(f"{where} is not a mimc manifest (a JSON object): re-create the artifact")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise NotAModelError(f"{where} has format_version {clip(version)}, this mimc reads {FORMAT_VERSION}: re-create the artifact with this mimc")
    shapes = {"encoder": dict, "source": dict, "stages": list, "files": dict}
    for key, kind in shapes.items():
        if key in data and not isinstance(data[key], kind):
            raise NotAModelError(f"{where}: '{key}' must be a JSON {'object' if kind is dict else 'list'}: re-create the artifact")
    if "encoder" not in data:
        raise NotAModelError(f"{where} has no 'encoder': re-create the artifact")
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in data.get("stages", [])):
        raise NotAModelError(f"{where}: every entry of 'stages' must be a JSON object with a text 'name': re-create the artifact")
    for name, entry in data.get("files", {}).items():  # names mimc reads, replaces and removes inside the folder
        if not isinstance(entry, dict):
            raise NotAModelError(f"{where}: every entry of 'files' must be a JSON object: re-create the artifact")
        names = [name, *(entry.get(key) for key in ("file", "external_data", "sidecar") if entry.get(key) is not None)]
        if not all(isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n for n in names):
            raise NotAModelError(f"{where}: 'files' names a path outside the artifact ({clip(names)}): re-create the artifact")
        stage = entry.get("stage", {})  # what a replay reads: which stage wrote the file, with which options
        if not isinstance(stage, dict) or stage.get("name") == "quantize" and not isinstance(entry.get("config"), dict):
            raise NotAModelError(f"{where}: files[{clip(name)}] needs a 'stage' object (and, quantized, a 'config' object): re-create the artifact")
    sha = data.get("weights_sha256")
    if not (isinstance(sha, str) and _SHA256.match(sha)):
        raise NotAModelError(f"{where} has no valid weights_sha256 (64 hex digits): re-create the artifact")
    if data.get("manifest_sha256") != manifest_sha256(data):
        raise NotAModelError(f"{where} does not match its manifest_sha256 (edited after mimc wrote it, or the hash removed): "
                             "re-create the artifact")
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:
        raise NotAModelError(f"{where} is not a mimc manifest ({shorten(exc)}): re-create the artifact") from exc


T = TypeVar("T")


def update_manifest(path: str | os.PathLike, edit: Callable[[Manifest], T]) -> T:
    """Read the artifact's mimc.json, ``edit`` it and write it back (atomically), holding a lock on the
    folder meanwhile: of two processes recording files in one artifact (quantize -o a.onnx and -o
    b.onnx), neither record is lost. Returns what ``edit`` returns."""
    folder = Path(path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, or when the process dies
        manifest = read_manifest(folder)
        result = edit(manifest)
        write_json(folder / MANIFEST_NAME, manifest.to_dict())
        return result
    finally:
        os.close(fd)


def recorded_files(path: str | os.PathLike) -> set[str]:
    """The names of an artifact's own files: mimc.json, its weights, and every graph, IR or engine its
    mimc.json lists, with their weights and sidecars."""
    names = {MANIFEST_NAME, WEIGHTS_NAME}
    for name, entry in read_manifest(path).files.items():
        names.update(n for n in (name, *(entry.get(key) for key in ("file", "external_data", "sidecar"))) if n)
    return names


def verify_weights(path: str | os.PathLike, manifest: Manifest) -> Path:
    """The artifact's weights file, after checking it is the one its manifest names (sha256, streamed)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise NotAModelError(f"{path} has mimc.json but no {WEIGHTS_NAME}: re-create the artifact")
    if sha256_file(weights) != manifest.weights_sha256:
        raise NotAModelError(
            f"{weights} does not match the weights_sha256 in {Path(path) / MANIFEST_NAME} (altered or swapped): re-create the artifact"
        )
    return weights


def verify_graph(path: str | os.PathLike) -> str | None:
    """Check a graph file (and the external data file beside it) against what its artifact's
    ``mimc.json`` recorded when it was written; returns the graph's sha256 when it was computed.

    A graph outside an artifact has nothing to be checked against (None). One inside an artifact
    that its manifest does not list with a sha256 (put there by hand, or its entry removed), or whose
    bytes, or whose ``.data`` file's bytes, differ from the recorded sha256, is refused, like swapped weights.
    """
    path = Path(path)
    if not is_artifact(path.parent):
        return None
    entry = read_manifest(path.parent).files.get(path.name)
    where = path.parent / MANIFEST_NAME
    built = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("source", "device", "precision"))  # an IR, an engine
    fix = (f"rebuild it (mimc build {path.parent / entry['source']} --device {entry['device']} --precision {entry['precision']} "
           f"-o {path})" if built
           else f"re-export it (mimc export {path.parent})") + " or restore the file mimc wrote"
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise NotAModelError(f"{path} lies in an artifact whose {MANIFEST_NAME} does not list it with its sha256: {fix}, "
                             "or move it out of the artifact")
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        raise NotAModelError(f"{path} does not match the sha256 recorded in {where} (altered or swapped): {fix}")
    # the weights file mimc writes beside a graph (an IR's .bin, a big graph's .data) is checked even
    # when the entry no longer names it: the graph reads it all the same
    beside = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(f"{path.name}.data")
    data = entry.get("external_data") or (beside.name if beside.is_file() else None)
    if data:
        data_path = path.parent / str(data)
        if Path(str(data)).name != str(data) or not data_path.is_file():
            raise NotAModelError(f"{path} keeps its weights in {data_path}, which is missing: {fix}")
        if sha256_file(data_path) != entry.get("external_data_sha256"):
            raise NotAModelError(f"{data_path} does not match the external_data_sha256 recorded in {where} "
                                 f"(altered, swapped or its hash removed): {fix}")
    return sha
