"""Random access to an image source: one raw image by position, without reading the rest.

A reader knows how many images a source holds, their labels and names (cheap: from paths, an index
or a label column), and reads one image when asked — in whatever process asks (DataLoader workers
open their own file handles). Random access is what lets a seeded subset skip the images it does
not use, a torchrun rank read only its shard, and a learning run resume mid-epoch exactly.

Here: the base :class:`Reader`, picture decoding, folders (images at the top, unlabelled, or one
subfolder per class searched recursively: ImageNet layout) and arrays (``.npy`` memory-mapped,
``.npz`` with ``images`` / ``labels`` / ``class_names``, never unpickled; ``builtin``). WebDataset
shards are :mod:`mimc.data.shards`, saved ``datasets`` folders :mod:`mimc.data.datasets_dir`, and
:func:`mimc.data.spec.open_reader` picks the reader for a spec.
"""
from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from mimc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "models" / "ref" / "builtin.npz"


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
    (PIL's own convert would clip every value above 255 to white); 32-bit ones (floats, or past 65535)
    are refused; RGBA and palette images are converted by PIL (alpha dropped), grey stays grey and is
    repeated to three channels."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        wide = np.asarray(im).astype(np.float64)
        if im.mode == "F" or wide.max(initial=0) > 65535:  # PIL's convert would clip them black or white
            raise ValueError(f"32-bit pixels (mode {im.mode}, up to {wide.max(initial=0):g}) of unknown range: save it as 8- or 16-bit")
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode(data: bytes | str | Path, what: str) -> np.ndarray:
    """Encoded image bytes (or a file path) -> uint8 RGB; DataError naming ``what`` when it fails."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # an image is read up to the bomb error's limit: the warning at half of it is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                return pil_rgb(im)
    except Image.DecompressionBombError:
        raise unreadable(what, ValueError(f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's limit against "
                                          "decompression bombs: downscale it")) from None
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise unreadable(what, exc) from None


def text_name(name: str) -> str:
    """A file or member name as text: bytes that are not UTF-8 as ``\\xNN`` (Python keeps them as lone
    surrogates, which Parquet, strict JSON readers and terminals refuse)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no text), for a one-line message."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def unreadable(what: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image {what} ({first_line(exc)}): remove or replace it, "
                     "or skip unreadable images with skip_corrupt", option="skip_corrupt")


def unlistable(exc: OSError) -> DataError:
    """A folder of a source that cannot be listed: refused, since leaving its images out would change the set."""
    return DataError(f"cannot list folder {exc.filename} ({exc.strerror or first_line(exc)}): make it readable "
                     "(chmod a+rx) or move it out of the data folder", option="data")


class FolderReader(Reader):
    def __init__(self, root: Path):
        super().__init__(str(root))
        try:
            entries = sorted(root.iterdir())
        except OSError as exc:
            raise unlistable(exc) from None
        subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        loose = [p for p in entries if not p.is_dir() and _is_image_name(p.name)]
        if subdirs and loose and not any(_images_under(d) for d in subdirs):  # not class folders: __MACOSX, thumbs
            subdirs = []
        if subdirs and loose:
            raise DataError(f"{root} has {len(subdirs)} class folders and {len(loose)} image{'s' * (len(loose) > 1)} ({loose[0].name}"
                            f"{', ...' * (len(loose) > 1)}) at its top: move the images into class folders", option="data")
        if subdirs:
            seen: set[str] = set()  # one folder linked from two classes would give its images both labels
            files = [(f, i) for i, d in enumerate(subdirs) for f in _images_under(d, seen)]
            self.class_names = [text_name(d.name) for d in subdirs]
        else:
            files = [(f, -1) for f in loose]
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}: point data at a folder of images", option="data")
        self.root = root
        self.files = [f for f, _ in files]
        self.labels = np.asarray([lab for _, lab in files]) if self.class_names else None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        if not self.files[i].is_file():  # a broken link, or a pipe that opening would wait on forever
            raise unreadable(str(self.files[i]), OSError("not a file"))
        return decode(self.files[i], str(self.files[i]))

    def name(self, i: int) -> str:
        return text_name(self.files[i].relative_to(self.root).as_posix())


def _is_image_name(name: str) -> bool:
    """An image suffix and not hidden: macOS leaves ``._photo.jpg`` metadata beside each copied photo."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images_under(folder: Path, seen: set[str] | None = None) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden files and folders skipped, linked folders followed), in sorted path
    order; a folder in ``seen`` (the real paths read so far) refused."""
    found, seen = [], set() if seen is None else seen

    def refuse(exc: OSError):
        raise unlistable(exc)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse, followlinks=True):  # linked folders are read too
        real = os.path.realpath(dirpath)
        if real in seen:
            raise DataError(f"{dirpath} leads to {real}, a folder already read (a link loop, or two links to one folder): "
                            "remove the link", option="data")
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if _is_image_name(f)]
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


def class_indices(labels: list[str], names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Text labels as indices of ``names`` (default: their sorted set), with the names."""
    names = sorted(set(labels)) if names is None else list(names)
    lookup = {name: k for k, name in enumerate(names)}
    return np.asarray([lookup[lab] for lab in labels], dtype=np.int64), names


def npz_labels(labels: np.ndarray, class_names: list[str] | None, path: Path | str) -> tuple[np.ndarray, list[str] | None]:
    """A .npz's ``labels`` as one whole-number class index per image (what every reader hands on):
    shape (N,) or (N, 1); text labels become indices of ``class_names`` (or of their sorted names, as
    shard labels do); whole-number floats are taken as integers; indices must fall in ``class_names``."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path} has labels of shape {labels.shape}: save one class label per image, shaped (N,)", option="data")
    if labels.dtype.kind in "US":
        text = [str(lab) for lab in labels.astype(str)]
        unknown = sorted(set(text) - set(class_names)) if class_names is not None else []
        if unknown:
            raise DataError(f"{path} has labels that are not among its class_names ({', '.join(unknown[:3])}): "
                            "save labels that are class names or indices of class_names", option="data")
        return class_indices(text, class_names)
    if labels.dtype.kind == "b" or (labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.rint(labels))):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path} has {labels.dtype} labels that are not whole numbers: save class indices (integers) "
                        "or class names", option="data")
    if class_names is not None and labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{path} has labels outside 0..{len(class_names) - 1}, the indices of its {len(class_names)} class_names: "
                        "save labels that index class_names", option="data")
    return labels, class_names


def _npz_member_bytes(path: Path, member: str) -> int:
    """The size an array in an .npz will have once loaded, from its header alone."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


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
                    size, memory = _npz_member_bytes(path, "images.npy"), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                    if size > memory // 2:  # a zip bomb, or just more than fits
                        raise DataError(f"{path} holds {size / 1e9:.1f} GB of images, which an .npz loads whole: more than half of this "
                                        f"machine's {memory / 1e9:.0f} GB; save them as .npy (memory-mapped)", option="data")
                    raw = loaded["images"]  # arrays of objects fail here (ValueError) rather than at np.load
                    if "labels" in loaded:
                        self.labels = np.asarray(loaded["labels"])
                    if "class_names" in loaded:
                        self.class_names = [str(c) for c in loaded["class_names"]]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {path} as numpy arrays without pickle ({first_line(exc)}): "
                            "save plain arrays with np.savez") from exc
        self.checked = raw.nbytes <= self.WHOLE_CHECK_BYTES
        if self.checked:
            check_array_values(raw, path)
        else:
            check_array_dtype(raw, path)
        if raw.ndim == 0:
            raise DataError(f"{path} holds a scalar, not images: save an array shaped (N, H, W[, C])")
        if len(raw) == 0:
            raise DataError(f"{path} holds no images: pass a non-empty data set")
        if self.labels is not None and len(self.labels) != len(raw):
            raise DataError(f"{path} has {len(self.labels)} labels for {len(raw)} images: save one label per image")
        if self.labels is not None:
            self.labels, self.class_names = npz_labels(self.labels, self.class_names, path)
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


__all__ = ["Reader", "FolderReader", "ArrayReader", "class_indices", "npz_labels", "check_array_values", "check_array_dtype", "pil_rgb", "decode",
           "first_line", "text_name", "unreadable", "IMAGE_SUFFIXES", "BUILTIN", "BUILTIN_PATH"]
