"""Random access to every kind of image source: one raw image by position, without reading the rest.

A reader knows how many images a source holds, their labels and names (cheap: from paths, an index
or a label column), and reads one image when asked — in whatever process asks (DataLoader workers
open their own file handles). Random access is what lets a seeded subset skip the images it does
not use, a torchrun rank read only its shard, and a learning run resume mid-epoch exactly.

- a folder: images at the top (unlabelled), or one subfolder per class, searched recursively
  (ImageNet layout: labels are the sorted class folders);
- ``.npy`` (memory-mapped, never read whole) or ``.npz`` (``images``, optional ``labels``,
  ``class_names``), never unpickled; ``builtin``: the labelled set shipped with mimc;
- WebDataset tar shards (``train-{000..099}.tar``): samples grouped by key (the member path up to
  the first dot of its base name), the image from the first image member (``jpg``, ``png``,
  ``webp``, ...), the label from ``cls`` / ``label`` text. Read with the standard library's
  ``tarfile`` into an index of member offsets: the ``webdataset`` package only iterates shards in
  order, which cannot give a seeded subset, a per-rank split of a global batch or an exact resume;
- a Hugging Face ``datasets`` directory written by ``save_to_disk`` (needs ``mimc[datasets]``): the
  image column (an ``Image`` feature, or named) and the label column (a ``ClassLabel``, or named).
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from mimc.errors import DataError, MissingExtraError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "models" / "ref" / "builtin.npz"
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
TAR_LABEL_EXTS = ("cls", "cls.txt", "cls2", "label", "label.txt", "class", "target", "target.txt")
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
SPEC_HELP = "pass an image folder, .npy/.npz, WebDataset shards (a .tar or a {000..009} pattern), a saved datasets folder or 'builtin'"


class Reader:
    """A source's images by position. ``kind``: "images" (decoded pictures) or "array" (rows of an array)."""

    kind = "images"
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __init__(self, spec: str):
        self.spec = spec

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        """The raw image (or array row) at position ``i``; a DataError naming it when it is unreadable."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"{self.spec}[{i}]"


# Pictures -----------------------------------------------------------------------------------------
def pil_rgb(im) -> np.ndarray:
    """An opened PIL image as uint8 RGB. 16-bit greys (PNG mode I;16 / I) are scaled from 0..65535
    (PIL's own convert would clip every value above 255 to white); RGBA and palette images are
    converted by PIL (alpha dropped), grey stays grey and is repeated to three channels."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode(data: bytes | str | Path, what: str) -> np.ndarray:
    """Encoded image bytes (or a file path) -> uint8 RGB; DataError naming ``what`` when it fails."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read image {what} ({reason}): remove or replace it, or skip unreadable images with skip_corrupt",
                        option="skip_corrupt") from None


class FolderReader(Reader):
    def __init__(self, root: Path):
        super().__init__(str(root))
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            files = [(f, i) for i, d in enumerate(subdirs) for f in _images_under(d)]
            self.class_names = [d.name for d in subdirs]
        else:
            files = [(f, -1) for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}: point data at a folder of images", option="data")
        self.root = root
        self.files = [f for f, _ in files]
        self.labels = np.asarray([lab for _, lab in files]) if self.class_names else None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        return decode(self.files[i], str(self.files[i]))

    def name(self, i: int) -> str:
        return self.files[i].relative_to(self.root).as_posix()


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden folders skipped), in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


# Arrays -------------------------------------------------------------------------------------------
def check_array_dtype(raw: np.ndarray, path: Path | str) -> None:
    kind = raw.dtype.kind
    if kind not in "biuf":
        what = {"c": "complex numbers", "O": "Python objects", "U": "text", "S": "bytes", "V": "records", "M": "dates",
                "m": "time spans"}.get(kind, str(raw.dtype))
        raise DataError(f"{path} holds {what} ({raw.dtype}), not image values: save real numbers (uint8 or float)", option="data")


def check_array_values(raw: np.ndarray, path: Path | str, where: str = "") -> None:
    """Refuse arrays that are not real numbers, or hold NaN / infinity (they would flow silently
    through every forward pass and make every fidelity number NaN)."""
    check_array_dtype(raw, path)
    if raw.dtype.kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise DataError(f"{path} holds {bad} NaN or infinite values{where}: replace them before using it as images", option="data")


class ArrayReader(Reader):
    """A ``.npy`` (memory-mapped) or ``.npz`` file; rows are images, clips or model inputs."""

    kind = "array"
    WHOLE_CHECK_BYTES = 256 << 20  # arrays up to this size are checked for NaN/inf at once; larger ones row by row

    def __init__(self, path: Path, spec: str | None = None):
        super().__init__(spec or str(path))
        self.path = path
        try:
            if path.suffix.lower() == ".npy":
                raw = np.load(path, allow_pickle=False, mmap_mode="r")
            else:
                with np.load(path, allow_pickle=False) as loaded:
                    if "images" not in loaded:
                        raise DataError(f"{path} has no 'images' array (keys: {list(loaded.keys())}): save it as np.savez(f, images=..., labels=...)")
                    raw = loaded["images"]  # arrays of objects fail here (ValueError) rather than at np.load
                    if "labels" in loaded:
                        self.labels = np.asarray(loaded["labels"])
                    if "class_names" in loaded:
                        self.class_names = [str(c) for c in loaded["class_names"]]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read {path} as numpy arrays without pickle ({reason}): save plain arrays with np.savez") from exc
        if raw.nbytes <= self.WHOLE_CHECK_BYTES:
            check_array_values(raw, path)
            self.checked = True
        else:
            check_array_dtype(raw, path)
            self.checked = False
        if raw.ndim == 0:
            raise DataError(f"{path} holds a scalar, not images: save an array shaped (N, H, W[, C])")
        if len(raw) == 0:
            raise DataError(f"{path} holds no images: pass a non-empty data set")
        if self.labels is not None and len(self.labels) != len(raw):
            raise DataError(f"{path} has {len(self.labels)} labels for {len(raw)} images: save one label per image")
        self.array = raw

    def __len__(self) -> int:
        return len(self.array)

    def read(self, i: int) -> np.ndarray:
        row = np.asarray(self.array[i])
        if not self.checked:
            check_array_values(row, self.path, f" in image {i}")
        return row

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Several rows at once (how an array source decides what its rows are)."""
        return np.asarray(self.array[np.asarray(positions)])


# WebDataset tar shards ----------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` lists; nested left to right.

    The brace forms WebDataset documents (zero padding kept from the first bound); written here
    because the ``braceexpand`` package would be a core dependency for these twenty lines.
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise DataError(f"shard pattern {pattern} counts down ({lo}..{hi}): write the range low..high", option="data")
        if int(hi) - int(lo) > 1_000_000:
            raise DataError(f"shard pattern {pattern} names over a million shards: check the range", option="data")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern} has a brace group {{{body}}} that is neither a..b nor a,b: fix the pattern", option="data")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def is_shard_spec(spec: str) -> bool:
    return "{" in spec or spec.lower().endswith(".tar")


class TarReader(Reader):
    """WebDataset shards read through an index of (shard, offset, size) per sample."""

    def __init__(self, pattern: str):
        super().__init__(pattern)
        paths = [Path(p) for p in expand_braces(pattern)]
        missing = [p for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise DataError(f"shard pattern {pattern} matches no file (first: {paths[0]}): check the path and the brace range", option="data")
        if missing:
            raise DataError(f"shard pattern {pattern}: {len(missing)} of {len(paths)} shards are missing (first: {missing[0]}): "
                            "fix the range or restore the shards", option="data")
        self.shards = paths
        self.items: list[tuple[int, int, int, str]] = []  # shard, data offset, size, member name
        labels: list[str | None] = []
        for s, path in enumerate(paths):
            for item, label in _index_shard(path, s):
                self.items.append(item)
                labels.append(label)
        if not self.items:
            raise DataError(f"shards {pattern} hold no images ({', '.join(TAR_IMAGE_EXTS)} members): point data at image shards", option="data")
        self.labels, self.class_names = _label_array(labels, pattern)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open for the reader's life
        return self._files[shard]

    def read(self, i: int) -> np.ndarray:
        shard, offset, size, member = self.items[i]
        f = self._file(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"shard {self.shards[shard]} is truncated at member {member}: re-create or re-download the shard", option="data")
        return decode(data, f"{self.shards[shard]}:{member}")

    def name(self, i: int) -> str:
        shard, _, _, member = self.items[i]
        return f"{self.shards[shard].name}:{member}"

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


def _index_shard(path: Path, s: int):
    """(item, label text) per sample of one shard, in member order; one line when the tar is bad."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    with open(path, "rb") as f:
        magic = f.read(6)
    packed = next((name for sig, name in COMPRESSED_MAGIC.items() if magic.startswith(sig)), None)
    if packed:
        raise DataError(f"{path} is a {packed}-compressed tar: WebDataset shards are read uncompressed (random access), "
                        "decompress it first", option="data")
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext.lower()] = member
            out = []
            for key in order:
                parts = samples[key]
                image_ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
                if image_ext is None:
                    continue
                member = parts[image_ext]
                label_ext = next((e for e in TAR_LABEL_EXTS if e in parts), None)
                label = None
                if label_ext is not None:
                    raw = tar.extractfile(parts[label_ext]).read(64)
                    label = raw.decode("utf-8", "replace").strip()
                out.append(((s, member.offset_data, member.size, member.name), label))
            return out
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable tar shard ({reason}): re-create or re-download it", option="data") from None


def _label_array(labels: list[str | None], spec: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Integer labels as given; text labels become indices of their sorted names. All or none."""
    if all(lab is None for lab in labels):
        return None, None
    if any(lab is None for lab in labels):
        raise DataError(f"{spec}: {sum(lab is None for lab in labels)} of {len(labels)} samples have no label (cls): "
                        "label every sample or none", option="data")
    if all(re.fullmatch(r"-?\d+", lab) for lab in labels):
        return np.asarray([int(lab) for lab in labels]), None
    names = sorted(set(labels))
    lookup = {n: k for k, n in enumerate(names)}
    return np.asarray([lookup[lab] for lab in labels]), names


# Hugging Face datasets ----------------------------------------------------------------------------
def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


class HFDatasetReader(Reader):
    """A ``datasets`` directory from ``save_to_disk`` (Arrow, memory-mapped: rows are read on demand)."""

    def __init__(self, path: Path, image_column: str | None = None, label_column: str | None = None):
        super().__init__(str(path))
        try:
            import datasets
        except ImportError:
            raise MissingExtraError("reading a saved datasets folder needs the datasets package, which is not installed: "
                                    "pip install 'mimc[datasets]'") from None
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path} holds the splits {', '.join(splits)}: point data at one of them ({path / (splits[0] if splits else 'train')})",
                            option="data")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid... on a bad folder
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read {path} as a saved datasets folder ({reason}): write it with Dataset.save_to_disk", option="data") from None
        features = ds.features
        columns = list(ds.column_names)
        if image_column is None:
            found = [c for c, f in features.items() if type(f).__name__ == "Image"]
            if len(found) != 1:
                raise DataError(f"{path} has {'no' if not found else len(found)} image columns (columns: {', '.join(columns)}): "
                                "name the one to use with image_column", option="image_column")
            image_column = found[0]
        elif image_column not in columns:
            raise DataError(f"{path} has no column '{image_column}' (columns: {', '.join(columns)}): name the image column with image_column",
                            option="image_column")
        if label_column is None:
            found = [c for c, f in features.items() if type(f).__name__ == "ClassLabel"]
            label_column = found[0] if len(found) == 1 else ("label" if "label" in columns else None)
        elif label_column not in columns:
            raise DataError(f"{path} has no column '{label_column}' (columns: {', '.join(columns)}): name the label column with label_column",
                            option="label_column")
        if len(ds) == 0:
            raise DataError(f"{path} holds no rows: pass a non-empty data set", option="data")
        self.image_column, self.label_column = image_column, label_column
        if label_column is not None:
            self.labels = np.asarray(ds.data.column(label_column).to_numpy(zero_copy_only=False))
            if self.labels.dtype.kind not in "iu":
                raise DataError(f"{path} column '{label_column}' holds {self.labels.dtype} values, not class indices: "
                                "cast it to a ClassLabel or name another label_column", option="label_column")
            names = getattr(features[label_column], "names", None)
            self.class_names = list(names) if names else None
        self.dataset = ds.select_columns([image_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> np.ndarray:
        what = f"{self.spec}[{i}]"
        try:
            value = self.dataset[int(i)][self.image_column]
        except Exception as exc:  # PIL errors raised while datasets decodes the cell
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read image {what} ({reason}): remove or replace it, or skip unreadable images with skip_corrupt",
                            option="skip_corrupt") from None
        if hasattr(value, "convert"):  # a decoded PIL image
            return pil_rgb(value)
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return decode(value.get("bytes") or value["path"], what)
        if isinstance(value, (list, np.ndarray)):
            return np.asarray(value)
        raise DataError(f"{self.spec} column '{self.image_column}' holds {type(value).__name__}, not images: name the image column with image_column",
                        option="image_column")


# Dispatch -----------------------------------------------------------------------------------------
def open_reader(spec: str | Path, image_column: str | None = None, label_column: str | None = None) -> Reader:
    """The reader for a data spec; a one-line DataError when it names nothing readable."""
    spec = str(spec)
    if spec == BUILTIN:
        if not BUILTIN_PATH.is_file():
            raise DataError(f"built-in images missing at {BUILTIN_PATH}: reinstall mimc")
        return ArrayReader(BUILTIN_PATH, BUILTIN)
    if is_shard_spec(spec):
        return TarReader(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: {SPEC_HELP}", option="data")
    if is_saved_dataset(path):
        return HFDatasetReader(path, image_column, label_column)
    if path.is_dir():
        return FolderReader(path)
    if path.suffix.lower() in (".npz", ".npy"):
        return ArrayReader(path)
    raise DataError(f"{path} is neither a folder nor a .npy/.npz file: {SPEC_HELP}", option="data")


__all__ = ["Reader", "FolderReader", "ArrayReader", "TarReader", "HFDatasetReader", "open_reader", "expand_braces",
           "check_array_values", "pil_rgb", "decode", "IMAGE_SUFFIXES", "BUILTIN", "BUILTIN_PATH"]
