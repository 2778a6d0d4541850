"""The artifact directory: ``model.safetensors`` + ``mimc.json`` (config, source, lineage).

Every write is atomic: files go to a temporary sibling and are renamed into place, so a crash
leaves either the old state or the new one, never half of each. Inputs are never modified.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mimc.errors import BadInputError, NotAModelError, clip, shorten

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
    """mkstemp/mkdtemp (and safetensors) create 0600/0700 entries; give outputs the permissions a
    plain write would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|old|lock)$")


def sweep_stale_temps(parent: str | os.PathLike, name: str) -> None:
    """Remove ``.NAME.<pid>.<rand>.tmp`` (and ``.old`` / ``.lock``) left by killed processes.

    Temporaries carry the pid of their writer, so one whose process is gone can be removed safely
    the next time the same output is written; a live writer's temporaries are left alone.
    """
    parent = Path(parent)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m.group("name") != name or _pid_alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"output folder {path.parent} does not exist: create it or choose another output path")
    sweep_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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


def _resolved(path: str | os.PathLike) -> Path | None:
    try:
        return Path(os.path.abspath(Path(path).expanduser())).resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def check_not_input(output: str | os.PathLike, inputs: Any = (), option: str | Sequence[str] = "output",
                    inside: bool = True) -> None:
    """Refuse an output that is one of the inputs, lies inside one (unless ``inside=False``: a graph
    file added to an artifact), or contains one: writing it would replace or swallow what is read."""
    raw = str(output)
    out = _resolved(output)
    if raw.strip() == "" or Path(raw).name in ("", ".", "..") or out in (_resolved("."), Path("/")):
        raise BadInputError(f"output {clip(raw)} is not a new folder or file name: give one like out", option=option)
    if out is None:
        return
    for item in inputs or ():
        if item is None or not isinstance(item, (str, os.PathLike)) or str(item) in ("", "ref", "builtin"):
            continue
        src = _resolved(item)
        if src is None or not src.exists():
            continue
        if out == src:
            why = "is the input"
        elif inside and src in out.parents:
            why = "lies inside the input"
        elif out in src.parents:
            why = "contains the input"
        else:
            continue
        raise BadInputError(f"output {shorten(output)} {why} {shorten(item)}: choose an output outside every input", option=option)


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Any = ()) -> None:
    """Refuse an unusable output before any work: the current folder, an input, an occupied folder
    (unless ``overwrite``) or a place this user cannot write. ``atomic_dir`` checks again at the end."""
    path = Path(path)
    check_not_input(path, inputs)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise BadInputError(f"{path} already exists and is not empty: choose another output or allow overwrite", option=("output", "overwrite"))
    check_writable(path)


def check_writable(path: str | os.PathLike) -> None:
    """The nearest existing folder at or above ``path``'s parent must be writable."""
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"cannot write {path}: {parent} is not a folder; choose another output", option="output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {path}: {parent} is not writable; choose another output", option="output")


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (FileExistsError otherwise), in one step
    where the kernel offers it (Linux renameat2 RENAME_NOREPLACE)."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2() or False
    if _renameat2:
        if _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    # No renameat2 here: writers of one output are already serialised by _output_lock.
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


_renameat2: Any = None


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@contextlib.contextmanager
def _output_lock(path: Path) -> Iterator[None]:
    """An O_EXCL lock file ``.NAME.lock`` (holding the writer's pid) beside ``path`` while it is
    written: a second writer of the same output is refused instead of both claiming it. The lock of
    a writer that died is taken over."""
    lock = path.parent / f".{path.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise BadInputError(f"another mimc process (pid {pid}) is writing {path}: wait for it or choose another output",
                                    option="output") from None
            with contextlib.suppress(OSError):
                lock.unlink()  # left by a killed writer (or half-written): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise BadInputError(f"another mimc process is writing {path}: wait for it or choose another output", option="output")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``path`` on success.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is swapped out only after
    the new contents are complete. Without ``overwrite`` the final rename never replaces anything: of
    two processes writing the same output, exactly one wins and the other is refused.
    """
    path = Path(path)
    check_output(path, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(parent, path.name)
    with _output_lock(path):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent))
        try:
            yield tmp
            _default_mode(tmp, directory=True)
            _place(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    taken = BadInputError(f"{path} was written by another process meanwhile: choose another output", option="output")
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        with contextlib.suppress(OSError):
            path.rmdir()  # an empty folder made for the output is replaced (nothing is lost)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise taken
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        try:
            _rename_noreplace(tmp, path)
        except FileExistsError:
            raise taken from None
        except OSError:
            os.replace(old / path.name, path)  # keep the previous contents when the new ones cannot go in
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:
        raise taken from None


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
        _default_mode(tmp / WEIGHTS_NAME, directory=False)  # safetensors creates it 0600
        manifest.weights_sha256 = sha256_file(tmp / WEIGHTS_NAME)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    encoder.manifest = manifest
    return out_dir


def is_artifact(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    where = path / MANIFEST_NAME
    try:
        data = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAModelError(f"{where} is not readable JSON ({shorten(exc)}): re-create the artifact") from exc
    if not isinstance(data, dict):
        raise NotAModelError(f"{where} is not a mimc manifest (a JSON object): re-create the artifact")
    shapes = {"encoder": dict, "source": dict, "stages": list, "files": dict}
    for key, kind in shapes.items():
        if key in data and not isinstance(data[key], kind):
            raise NotAModelError(f"{where}: '{key}' must be a JSON {'object' if kind is dict else 'list'}: re-create the artifact")
    if "encoder" not in data:
        raise NotAModelError(f"{where} has no 'encoder': re-create the artifact")
    if not all(isinstance(s, dict) for s in data.get("stages", [])):
        raise NotAModelError(f"{where}: every entry of 'stages' must be a JSON object: re-create the artifact")
    sha = data.get("weights_sha256")
    if not (isinstance(sha, str) and _SHA256.match(sha)):
        raise NotAModelError(f"{where} has no valid weights_sha256 (64 hex digits): re-create the artifact")
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:
        raise NotAModelError(f"{where} is not a mimc manifest ({shorten(exc)}): re-create the artifact") from exc


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
