"""Atomic writes and output claims: a file or folder appears whole or not at all, never replaces an
input, and of two processes writing one output exactly one wins.

Files and folders are written under a temporary sibling named ``.NAME.<pid>.<rand>.tmp`` and renamed
into place; a folder output is claimed with an O_EXCL lock file and moved with
``renameat2(RENAME_NOREPLACE)``, so a racing writer is refused instead of silently replaced.
Temporaries whose writer process is gone are swept the next time that output is written.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from mimc.errors import BadInputError, MimcError, clip, shorten

NAME_MAX = 255  # bytes in one file name (Linux, macOS)
TEMP_ROOM = 32  # what a temporary name adds: .NAME.<pid>.<8 random>.tmp


def _umask() -> int:
    """The process umask, read without setting it where the OS allows (Linux): setting it, even for an
    instant, races with any other thread of the process creating a file."""
    try:
        return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, IndexError, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp (and safetensors) create 0600/0700 entries; give outputs the permissions a
    plain write would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # someone else's live process
    return True


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|old|lock)$")


def sweep_stale_temps(parent: str | os.PathLike, name: str) -> None:
    """Remove the ``.NAME.<pid>.<rand>.tmp`` (and ``.old`` / ``.lock``) of writers whose process is gone;
    a live writer's temporaries are left alone."""
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


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A disk that fills up or is read-only while ``path`` is written: one line naming it (where it goes,
    not its temporary name) and the fix, instead of the OSError."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        raise write_error(path, exc.strerror, "choose another output" if exc.errno == errno.EROFS else None) from None


def write_error(path: str | os.PathLike, why: str, fix: str | None = None) -> MimcError:
    """'cannot write PATH (why): fix', PATH where the output goes (each ``.NAME.<pid>.<rand>.tmp`` in it as NAME)."""
    shown = Path(*[m.group("name") if (m := _TEMP.match(part)) else part for part in Path(path).parts])
    return MimcError(f"cannot write {shown} ({why}): {fix or 'free space there or choose another output'}", option="output")


def _temp(path: Path, suffix: str = ".tmp", directory: bool = False) -> Path:
    """A new empty file (or folder) ``.NAME.<pid>.<rand><suffix>`` beside ``path``."""
    names = {"prefix": f".{path.name}.{os.getpid()}.", "suffix": suffix, "dir": path.parent}
    if directory:
        return Path(tempfile.mkdtemp(**names))
    fd, tmp = tempfile.mkstemp(**names)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"output folder {path.parent} does not exist: create it or choose another output path")
    if path.is_dir():
        raise BadInputError(f"output {path} is a directory: give a file path", option="output")
    sweep_stale_temps(path.parent, path.name)
    with writing(path):
        tmp_path = _temp(path)
        try:
            yield tmp_path
            default_mode(tmp_path, directory=False)
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


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
    parts = [len(os.fsencode(part)) for part in Path(raw).parts] or [0]
    if max(parts[:-1] + [parts[-1] + TEMP_ROOM]) > NAME_MAX:  # the output is written as .NAME.<pid>.<rand>.tmp first
        raise BadInputError(f"output {clip(raw)} has a name longer than file systems allow ({NAME_MAX} bytes, "
                            f"{TEMP_ROOM} of them kept for its temporary name): choose a shorter one", option=option)
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
        raise BadInputError(f"output {shorten(output, keep_end=True)} {why} {shorten(item, keep_end=True)}: choose an output outside every input", option=option)


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
    renameat2 = _renameat2()
    if renameat2:
        if renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
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


@functools.cache
def _renameat2():
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
    a writer that died is taken over; one this process holds already (``claim_output``) is kept."""
    lock = path.parent / f".{path.name}.lock"
    try:
        mine = lock.read_text().strip() == str(os.getpid())
    except OSError:
        mine = False
    if mine:
        yield
        return
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
def claim_output(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``path``'s writer lock for a whole run (a learning run writes checkpoints into its output
    and replaces them at the end): a second process writing it is refused at its start, not overwritten."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _output_lock(path):
            yield
    finally:
        for folder in made:  # a refused or failed run leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()


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
    with writing(path), _output_lock(path):
        tmp = _temp(path, directory=True)
        try:
            yield tmp
            default_mode(tmp, directory=True)
            _place(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        with contextlib.suppress(OSError):
            path.rmdir()  # an empty folder made for the output is replaced (nothing is lost)
    if not overwrite or not (path.exists() or path.is_symlink()):
        _place_new(tmp, path)
        return
    old = _temp(path, ".old", directory=True)
    os.replace(path, old / path.name)
    try:
        _place_new(tmp, path)
    except OSError:
        os.replace(old / path.name, path)  # keep the previous contents when the new ones cannot go in
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _place_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, refused (never replacing it) when another process placed ``path`` meanwhile."""
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:
        raise BadInputError(f"{path} was written by another process meanwhile: choose another output",
                            option="output") from None


def check_new_files(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> None:
    """Refuse before any work: a missing output folder, or a file output that exists (unless ``overwrite``)."""
    for path in map(Path, paths):
        if not path.parent.is_dir():
            raise BadInputError(f"output folder {path.parent} does not exist: create it or choose another output", option="output")
        if path.is_dir():
            raise BadInputError(f"{path} is a folder: name a file as the output", option="output")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise BadInputError(f"{path} already exists: choose another output or allow overwrite", option=("output", "overwrite"))
        check_writable(path)


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths`` that become them together on success.

    For an output made of several files (features and their index): the first path is claimed with
    a lock file (of two mimc processes writing it, one is refused), an existing file is refused unless
    ``overwrite``, and on any error or interrupt every temporary is removed and nothing is placed (a
    file placed before a later one failed to go in is taken back).
    """
    paths = [Path(p) for p in paths]
    check_new_files(paths, overwrite)
    for path in paths:
        sweep_stale_temps(path.parent, path.name)
    with _output_lock(paths[0]):
        tmps: list[Path] = []
        placed: list[Path] = []
        try:
            for path in paths:
                tmps.append(_temp(path))
            yield tmps
            for tmp, path in zip(tmps, paths):
                default_mode(tmp, directory=False)
                if overwrite:
                    os.replace(tmp, path)
                else:
                    _place_new(tmp, path)
                placed.append(path)
        except BaseException:
            if not overwrite:
                for path in placed:  # new files only: an overwritten one cannot be given back
                    with contextlib.suppress(OSError):
                        path.unlink()
            raise
        finally:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
