"""The encoder's preprocessing, one image at a time (what a DataLoader worker runs).

Resize the short side to ``image_size / crop_pct`` (bicubic) and centre crop (or resize straight to
``image_size`` square: ``resize="squash"``), scale to [0, 1], normalise by the config's mean and std
— geometry, mean and std read from the model's ``preprocessor_config.json`` when it came with one. A
video encoder given still images sees each image repeated over its frames. Each image is prepared on
its own, so a batch is the same bytes however the set is cut into batches or spread over workers.
"""
from __future__ import annotations

import numpy as np
import torch

from mimc.errors import DataError


def pixel_scale(values: np.ndarray, what: str = "an image array") -> float:
    """What image values that are not uint8 are multiplied by to reach 0..255: integers past 255 are
    16-bit (1/257, as pil_rgb reads 16-bit files), other integers 8-bit, and past 65535 or negative
    refused (of unknown range, as 32-bit files are); floats are 0..1 (255) unless they reach 2, then
    0..255 (a 0..1 image resampled a little past 1 stays 0..1)."""
    top = float(values.max()) if values.size else 0.0
    if values.dtype.kind in "iu":
        if top > 65535 or values.min(initial=0) < 0:
            raise DataError(f"{what} holds integer pixel values from {values.min()} to {values.max()}, outside 0..65535: "
                            "save 8- or 16-bit images (uint8, uint16)", option="data")
        return 1 / 257 if top > 255 else 1.0
    return 255.0 if top < 2 else 1.0


def to_uint8_hwc(arr: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Accept (H, W), (H, W, C) or (C, H, W) in uint8, float [0, 1] / [0, 255] or 16-bit integers; return
    uint8 (H, W, 1, 3 or 4). ``scale``: :func:`pixel_scale` of the whole source (default: of this image)."""
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
        scale = pixel_scale(arr) if scale is None else scale
        wide = np.rint(arr.astype(np.float64) * scale) if arr.dtype.kind in "iu" else arr.astype(np.float32) * scale
        arr = np.clip(wide, 0, 255).astype(np.uint8)
    return arr


def resize_crop(img_hwc: np.ndarray, size: int, resize: str = "shortest", crop_pct: float = 1.0) -> np.ndarray:
    """Resize the short side to ``size / crop_pct`` (bicubic) and centre crop ``size`` — or, with
    ``resize="squash"``, resize to ``size`` x ``size``; returns float32 HWC in [0, 1]."""
    from PIL import Image

    pil = Image.fromarray(img_hwc[:, :, 0] if img_hwc.shape[2] == 1 else img_hwc)
    if resize == "squash":
        pil = pil.resize((size, size), Image.BICUBIC)
    else:
        w, h = pil.size
        short = size if crop_pct == 1.0 else int(np.floor(size / crop_pct))
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        pil = pil.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    out = np.asarray(pil, dtype=np.float32) / 255.0
    return out[:, :, None] if out.ndim == 2 else out


def _channels(x: np.ndarray, in_chans: int) -> np.ndarray:
    channels = x.shape[2]
    if channels == in_chans:
        return x
    if channels == 1 and in_chans == 3:
        return np.repeat(x, 3, axis=2)
    if channels in (3, 4) and in_chans == 1:
        return x[:, :, :3].mean(axis=2, keepdims=True)
    if channels == 4 and in_chans == 3:
        return x[:, :, :3]
    raise DataError(f"images have {channels} channels but the model expects {in_chans}: convert the images")


def prepare_image(img: np.ndarray, cfg, scale: float | None = None) -> torch.Tensor:
    """One raw image (uint8 / float / 16-bit, HWC or CHW; ``scale``: see :func:`to_uint8_hwc`) -> the model
    input (C, H, W) or (T, C, H, W)."""
    x = _channels(resize_crop(to_uint8_hwc(img, scale), cfg.image_size, cfg.resize, cfg.crop_pct), cfg.in_chans).transpose(2, 0, 1)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    pixels = torch.from_numpy(((x - mean) / std).astype(np.float32))
    if cfg.is_video:
        pixels = pixels[None].expand(cfg.num_frames, -1, -1, -1).contiguous()
    return pixels


def preprocess(images: list[np.ndarray], cfg) -> torch.Tensor:
    """uint8 HWC images -> normalised tensor shaped for ``cfg`` (an EncoderConfig)."""
    return torch.stack([prepare_image(img, cfg) for img in images])


class ArrayLayout:
    """How rows of one array source become model inputs, decided once per source (not per batch).

    Float rows already shaped like the model's input are taken as model inputs when they look
    normalised (negative values among the first rows drawn); float images in [0, 1] of the same
    shape are preprocessed like any image, every row scaled alike (:func:`pixel_scale` of the first
    rows drawn, not image by image). Video rows (T, H, W, C) are resized frame by frame.
    Normalised model inputs (negative values) of another shape are refused: resized as images, model
    inputs of the wrong size or channel count would be silently resampled.
    """

    def __init__(self, sample: np.ndarray, cfg, spec: str):
        expected = tuple(cfg.input_shape)
        self.cfg = cfg
        self.model_inputs = (sample.ndim == len(expected) + 1 and tuple(sample.shape[1:]) == expected
                             and sample.dtype.kind == "f" and sample.size > 0 and float(sample.min()) < 0)
        self.video_frames = None
        self.scale = pixel_scale(sample, spec)
        if not self.model_inputs and cfg.is_video and sample.ndim == 5:
            if sample.shape[1] != cfg.num_frames:
                raise DataError(f"video array has {sample.shape[1]} frames but the model expects {cfg.num_frames}: resample the clips")
            self.video_frames = sample.shape[1]
        elif not self.model_inputs and sample.ndim not in (3, 4):
            raise DataError(f"array of shape {sample.shape} is not a batch of images: expected (N, H, W[, C]) or (N, C, H, W)")
        elif not self.model_inputs and sample.ndim == 3 and sample.shape[2] in (3, 4):  # no picture is that narrow
            raise DataError(f"{spec} holds rows of shape {sample.shape[1:]}, grey images {sample.shape[2]} pixels wide: one image "
                            "saved without its batch axis? save images as (N, H, W, C) (one image: x[None])", option="data")
        if (sample.dtype.kind == "f" and sample.size and sample.ndim >= 2 and float(np.min(sample[:8])) < 0
                and tuple(sample.shape[1:]) != expected):
            raise DataError(f"{spec} holds model inputs of shape {tuple(sample.shape[1:])} but the model expects "
                            f"{expected}: save inputs for this model or raw images (uint8) to be resized")

    def prepare(self, row: np.ndarray) -> torch.Tensor:
        if self.model_inputs:
            return torch.from_numpy(np.array(row, dtype=np.float32))
        if self.video_frames is not None:
            still = self.cfg.replace(num_frames=1, tubelet_size=1)
            return torch.stack([prepare_image(frame, still, self.scale) for frame in row])
        return prepare_image(np.asarray(row), self.cfg, self.scale)


__all__ = ["pixel_scale", "to_uint8_hwc", "resize_crop", "prepare_image", "preprocess", "ArrayLayout"]
