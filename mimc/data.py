"""The only code that reads images and turns them into batches.

A data spec is one of:
- a folder of images (flat, or one subfolder per class: then labels come with them),
- a ``.npy`` array (N, H, W, C) / (N, C, H, W) / video (N, T, ...), or a ``.npz`` with ``images``
  (and optionally ``labels``, ``class_names``),
- ``builtin``: the labelled images shipped with mimc (see ``mimc/models/ref/``).

Preprocessing follows the encoder's own input spec: resize the short side, centre crop to
``image_size``, scale to [0, 1], normalise by the config's mean and std. A video encoder given still
images sees each image repeated over its frames.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mimc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).parent / "models" / "ref" / "builtin.npz"


@dataclass
class ImageSet:
    """Preprocessed inputs for one encoder, with labels when the source has them."""

    pixels: torch.Tensor  # (N, C, H, W) or (N, T, C, H, W), float32, normalised
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str
    sha256: str  # hash of the preprocessed pixels: identifies the calibration set in manifests

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def batches(self, batch_size: int = 16) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield self.pixels[i : i + batch_size]

    def subset(self, index: np.ndarray | list[int]) -> "ImageSet":
        index = np.asarray(index)
        labels = self.labels[index] if self.labels is not None else None
        pixels = self.pixels[torch.as_tensor(index, dtype=torch.long)]
        return ImageSet(pixels, labels, self.class_names, self.source, _hash_tensor(pixels))


def _hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _to_uint8_hwc(arr: np.ndarray) -> np.ndarray:
    """Accept (H, W), (H, W, C) or (C, H, W) in uint8 or float [0, 1]; return uint8 (H, W, 3 or 1)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"image array has shape {arr.shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[2] not in (1, 3, 4):
        raise DataError(f"image has {arr.shape[2]} channels (shape {arr.shape}): expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return arr


def _resize_crop(img_hwc: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre crop; returns float32 HWC in [0, 1]."""
    from PIL import Image

    pil = Image.fromarray(img_hwc[:, :, 0] if img_hwc.shape[2] == 1 else img_hwc)
    w, h = pil.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    out = np.asarray(pil, dtype=np.float32) / 255.0
    return out[:, :, None] if out.ndim == 2 else out


def preprocess(images: list[np.ndarray], cfg) -> torch.Tensor:
    """uint8 HWC images -> normalised tensor shaped for ``cfg`` (an EncoderConfig)."""
    out = []
    for img in images:
        x = _resize_crop(_to_uint8_hwc(img), cfg.image_size)
        channels = x.shape[2]
        if channels != cfg.in_chans:
            if channels == 1 and cfg.in_chans == 3:
                x = np.repeat(x, 3, axis=2)
            elif channels in (3, 4) and cfg.in_chans == 1:
                x = x[:, :, :3].mean(axis=2, keepdims=True)
            elif channels == 4 and cfg.in_chans == 3:
                x = x[:, :, :3]
            else:
                raise DataError(f"images have {channels} channels but the model expects {cfg.in_chans}: convert the images")
        out.append(x)
    arr = np.stack(out).transpose(0, 3, 1, 2)  # N, C, H, W
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[None, :, None, None]
    pixels = torch.from_numpy(((arr - mean) / std).astype(np.float32))
    if cfg.is_video:
        pixels = pixels[:, None].expand(-1, cfg.num_frames, -1, -1, -1).contiguous()
    return pixels


def _normalise_array(arr: np.ndarray, cfg) -> torch.Tensor:
    """An array of raw images or already-shaped model inputs -> model inputs."""
    expected = tuple(cfg.input_shape)
    # Float arrays already shaped like the model's input are taken as model inputs only when they
    # look normalised (some negative values): float images in [0, 1] of the same shape get preprocessed.
    if arr.ndim == len(expected) + 1 and tuple(arr.shape[1:]) == expected and arr.dtype.kind == "f" and arr.size and arr.min() < 0:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # already model inputs
    if cfg.is_video and arr.ndim == 5:
        frames = arr.shape[1]
        if frames != cfg.num_frames:
            raise DataError(f"video array has {frames} frames but the model expects {cfg.num_frames}: resample the clips")
        flat = preprocess(list(arr.reshape(-1, *arr.shape[2:])), cfg.replace(num_frames=1, tubelet_size=1))
        return flat.reshape(arr.shape[0], frames, *flat.shape[1:])
    if arr.ndim not in (3, 4):
        raise DataError(f"array of shape {arr.shape} is not a batch of images: expected (N, H, W[, C]) or (N, C, H, W)")
    return preprocess(list(arr), cfg)


def _load_folder(root: Path) -> tuple[list[np.ndarray], np.ndarray | None, list[str] | None]:
    from PIL import Image, UnidentifiedImageError

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        files = [(f, i) for i, d in enumerate(subdirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        class_names = [d.name for d in subdirs]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        class_names = None
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}: point data at a folder of images", option="data")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                images.append(_pil_rgb(im))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {f} ({exc}): remove or replace it") from exc
    labels = np.asarray([lab for _, lab in files]) if class_names else None
    return images, labels, class_names


def _pil_rgb(im) -> np.ndarray:
    """An opened PIL image as uint8 RGB. 16-bit greys (PNG mode I;16 / I) are scaled from 0..65535
    (PIL's own convert would clip every value above 255 to white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def check_array_values(raw: np.ndarray, path: Path) -> None:
    """Refuse arrays that are not real numbers, or hold NaN / infinity (they would flow silently
    through every forward pass and make every fidelity number NaN)."""
    kind = raw.dtype.kind
    if kind not in "biuf":
        what = {"c": "complex numbers", "O": "Python objects", "U": "text", "S": "bytes", "V": "records", "M": "dates",
                "m": "time spans"}.get(kind, str(raw.dtype))
        raise DataError(f"{path} holds {what} ({raw.dtype}), not image values: save real numbers (uint8 or float)", option="data")
    if kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise DataError(f"{path} holds {bad} NaN or infinite values: replace them before using it as images", option="data")


def _load_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A .npy array, or a .npz with ``images`` (and optional ``labels``, ``class_names``); never unpickles."""
    labels = class_names = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if path.suffix.lower() == ".npy":
            return loaded, None, None
        with loaded:
            if "images" not in loaded:
                raise DataError(f"{path} has no 'images' array (keys: {list(loaded.keys())}): save it as np.savez(f, images=..., labels=...)")
            raw = loaded["images"]  # arrays of objects fail here (ValueError) rather than at np.load
            if "labels" in loaded:
                labels = loaded["labels"]
            if "class_names" in loaded:
                class_names = [str(c) for c in loaded["class_names"]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path} as numpy arrays without pickle ({reason}): save plain arrays with np.savez") from exc
    return raw, labels, class_names


def load_images(spec: str | Path, cfg, n: int | None = None, seed: int = 0) -> ImageSet:
    """Read and preprocess images for the encoder described by ``cfg``.

    ``n`` picks a seeded random subset (all images when None or larger than the set).
    """
    labels = class_names = None
    spec_str = str(spec)
    if spec_str == BUILTIN:
        path = BUILTIN_PATH
        if not path.is_file():
            raise DataError(f"built-in images missing at {path}: reinstall mimc")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"data path {path} does not exist: pass an image folder, a .npy/.npz file or 'builtin'")
    if path.is_dir():
        images, labels, class_names = _load_folder(path)
        raw: np.ndarray | list = images
    elif path.suffix.lower() in (".npz", ".npy"):
        raw, labels, class_names = _load_array_file(path)
    else:
        raise DataError(f"{path} is neither a folder nor a .npy/.npz file: pass an image folder, a .npy/.npz file or 'builtin'")

    if isinstance(raw, np.ndarray):
        check_array_values(raw, path)
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raise DataError(f"{path} holds a scalar, not images: save an array shaped (N, H, W[, C])")
    count = len(raw)
    if count == 0:
        raise DataError(f"{path} holds no images: pass a non-empty data set")
    if seed is not None and seed < 0:
        raise DataError(f"seed must be a non-negative whole number, got {seed}", option="seed")
    if n is not None and n < 1:
        raise DataError(f"n must be a positive number of images (or none for all), got {n}", option="n")
    if labels is not None and len(labels) != count:
        raise DataError(f"{path} has {len(labels)} labels for {count} images: save one label per image")
    index = np.arange(count)
    if n is not None and n < count:
        index = np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))
    if isinstance(raw, list):
        pixels = preprocess([raw[i] for i in index], cfg)
    else:
        pixels = _normalise_array(np.asarray(raw)[index], cfg)
    if labels is not None:
        labels = np.asarray(labels)[index]
    return ImageSet(pixels, labels, class_names, spec_str, _hash_tensor(pixels))


def deterministic_inputs(cfg, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal inputs of the encoder's shape (for validation and export)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *cfg.input_shape), generator=g)


class ImageSource:
    """A data spec plus a seed: what the pipeline hands every stage instead of a path.

    A stage asks for ``n`` images preprocessed for its encoder (:meth:`draw`); the same request
    returns the same images (a seeded subset) without reading the source again, so a run that
    calibrates, learns and evaluates reads each image set once.
    """

    def __init__(self, spec: str | Path, seed: int = 0):
        self.spec = str(spec)
        self.seed = seed
        self._drawn: dict[tuple, ImageSet] = {}
        self._fixed: ImageSet | None = None  # set by :meth:`of`

    def __repr__(self) -> str:
        return f"ImageSource({self.spec!r}, seed={self.seed})"

    @classmethod
    def of(cls, images: ImageSet) -> "ImageSource":
        """A source over images already in memory (a search's calibration split): every draw returns them."""
        source = cls(images.source)
        source._fixed = images
        return source

    def draw(self, cfg, n: int | None = None) -> ImageSet:
        """A seeded subset of ``n`` images (all when None) preprocessed for ``cfg``'s input spec."""
        if self._fixed is not None:
            return self._fixed
        key = (tuple(cfg.input_shape), tuple(cfg.image_mean), tuple(cfg.image_std), n)
        if key not in self._drawn:
            check_model_inputs_file(self.spec, cfg)
            self._drawn[key] = load_images(self.spec, cfg, n=n, seed=self.seed)
        return self._drawn[key]

    def batches(self, cfg, n: int | None = None, batch_size: int = 64) -> list[torch.Tensor]:
        return list(self.draw(cfg, n).batches(batch_size))


def check_model_inputs_file(spec: str, cfg) -> None:
    """An .npy/.npz of normalised model inputs (negative values) must have the model's exact shape.

    Float arrays are otherwise treated as images and resized; model inputs of the wrong size or
    channel count would then be silently resampled instead of refused.
    """
    path = Path(spec)
    if path.suffix not in (".npy", ".npz") or not path.is_file():
        return
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r") if path.suffix == ".npy" else np.load(path, allow_pickle=False)
        arr = loaded if path.suffix == ".npy" else (loaded["images"] if "images" in loaded else None)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return  # load_images reports unreadable files with its own message
    if arr is None or arr.dtype.kind != "f" or arr.size == 0 or arr.ndim == 0:
        return
    expected = tuple(cfg.input_shape)
    if float(np.min(arr[: min(len(arr), 8)])) < 0 and tuple(arr.shape[1:]) != expected:
        raise DataError(f"{path} holds model inputs of shape {tuple(arr.shape[1:])} but the model expects {expected}: "
                        "save inputs for this model or raw images (uint8) to be resized")
