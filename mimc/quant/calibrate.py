"""Activation ranges for static quantization, streamed over an fp32 ONNX graph.

Methods: ``minmax`` (observed range), ``percentile`` (clip the tails of the observed
distribution), ``entropy`` (TensorRT's KL-divergence threshold search on |x|).

Why not onnxruntime.quantization's calibrators: its histogram calibrators (Percentile, Entropy)
keep every intermediate output of every calibration batch in memory before building histograms
(ViT-B, 256 images: ~1.5 GB per MLP input, ~20 GB in all) and calibrate every float tensor of the
graph. Here only the tensors that get quantized are read, batch by batch, into fixed-range
histograms (two passes: range, then histogram), so memory is flat in the number of images and the
result is deterministic for the same inputs. A graph whose weights live in external data (past
2 GiB) is handed to ONNX Runtime as its small proto plus the folder of its weights (``base_dir``):
the weights are read once, by ONNX Runtime, and never serialised again.

References:
- Migacz, "8-bit Inference with TensorRT", GTC 2017 (entropy calibration: the KL search below).
- Wu et al., "Integer Quantization for Deep Learning Inference", arXiv 2004.09602 (percentile,
  entropy, max calibration compared).
- onnxruntime/python/tools/quantization/calibrate.py (microsoft/onnxruntime), the same methods.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx

from mimc.errors import DataError
from mimc.graph import single_input

METHODS = ("minmax", "percentile", "entropy")
HIST_BINS = 2048
KL_LEVELS = 128  # int8: 127 magnitudes + zero, as TensorRT's calibrator uses


def _tensor_reader(model, tensors: Sequence[str], calibration_batches: Iterable, base_dir=None):
    """(the distinct tensors, the calibration batches as the graph takes them, ``read(batch)`` -> (tensor,
    value) pairs): one ORT session over ``model`` that also returns the named intermediate tensors,
    for every pass. ``base_dir``: the folder its external-data tensors are read from."""
    from mimc.runtime.session import session_from_bytes

    name, batch, shape = single_input(model)
    chunks = _graph_batches(calibration_batches, batch, shape)
    tensors = list(dict.fromkeys(tensors))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in present:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    data = m.SerializeToString()
    del m
    sess = session_from_bytes(data, external_dir=base_dir, providers=["CPUExecutionProvider"])
    return tensors, chunks, lambda x: zip(tensors, sess.run(tensors, {name: x}))


def as_arrays(batches: Iterable | None) -> list[np.ndarray]:
    """Torch or numpy batches as contiguous float32 arrays (None: none)."""
    if batches is None:
        return []
    return [np.ascontiguousarray(b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b), dtype=np.float32)
            for b in batches]


def _graph_batches(batches: Iterable, graph_batch: int | None, input_shape: Sequence[int]) -> list[np.ndarray]:
    """Re-chunk the caller's batches to what the graph accepts (a static batch of 1, usually)."""
    arrays = as_arrays(batches)
    for a in arrays:
        if tuple(a.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"calibration images have shape {tuple(a.shape[1:])} but the graph expects {tuple(input_shape)}: "
                "use images for this model (mimc.data.load_images resizes folders; an .npz of model inputs must match)"
            )
    if not arrays:
        raise DataError("no calibration images: give data (a folder, .npz/.npy or 'builtin') with at least one image", option="data")
    full = np.concatenate(arrays)
    step = graph_batch or full.shape[0]
    usable = (full.shape[0] // step) * step
    if usable == 0:
        raise DataError(f"the graph has a static batch of {step} but only {full.shape[0]} calibration images were given: pass more images")
    return [full[i : i + step] for i in range(0, usable, step)]


class _Histogram:
    """Fixed-range signed histogram of one tensor, filled batch by batch."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi if hi > lo else lo + 1e-8
        self.counts = np.zeros(HIST_BINS, dtype=np.int64)

    def add(self, x: np.ndarray) -> None:
        self.counts += np.histogram(x, bins=HIST_BINS, range=(self.lo, self.hi))[0]

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, HIST_BINS + 1)


def _percentile_range(h: _Histogram, percentile: float) -> tuple[float, float]:
    """Cut (100 - p) % of the mass from each tail separately (asymmetric activations keep their skew)."""
    cdf = np.cumsum(h.counts) / max(1, h.counts.sum())
    tail = (100.0 - percentile) / 100.0
    edges = h.edges()
    lo = edges[int(np.searchsorted(cdf, tail, side="right"))]
    hi = edges[min(HIST_BINS, int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1)]
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def kl_threshold(abs_counts: np.ndarray, bin_width: float, levels: int = KL_LEVELS, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the |x| threshold whose ``levels``-level quantization of the
    clipped histogram is closest to it in KL divergence (thresholds searched every ``stride`` bins)."""
    nbins = abs_counts.shape[0]
    if abs_counts.sum() == 0 or nbins <= levels:
        return float(nbins * bin_width)
    best, best_i = np.inf, nbins
    for i in range(levels, nbins + 1, stride):
        p = abs_counts[:i].astype(np.float64).copy()
        p[i - 1] += abs_counts[i:].sum()  # clipped mass lands in the last kept bin
        nonzero = abs_counts[:i] > 0
        # Merge the i bins into `levels` groups, then spread each group's mass over its non-empty bins.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=abs_counts[:i].astype(np.float64), minlength=levels)
        used = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[groups] / np.maximum(used[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(best_i * bin_width)


def _entropy_range(h: _Histogram, levels: int = KL_LEVELS) -> tuple[float, float]:
    edges = h.edges()
    centres = 0.5 * (edges[:-1] + edges[1:])
    amax = max(abs(h.lo), abs(h.hi))
    abs_counts = np.histogram(np.abs(centres), bins=HIST_BINS, range=(0.0, amax), weights=h.counts)[0]
    t = kl_threshold(abs_counts, amax / HIST_BINS, levels)
    return float(max(h.lo, -t, -amax)), float(min(h.hi, t))


def collect_ranges(model, tensors: Sequence[str], calibration_batches: Iterable, method: str = "minmax",
                   percentile: float = 99.99, kl_levels: int = KL_LEVELS, observed: Sequence[str] = (),
                   base_dir=None) -> tuple[dict[str, tuple[float, float]], int]:
    """Per-tensor (min, max) to quantize with, and the number of images seen.

    ``model`` is an fp32 ``onnx.ModelProto``; every range includes 0 (zero must be exact).
    ``kl_levels``: quantization levels the entropy search assumes on |x| (128 for symmetric int8;
    asymmetric u8 spends its 256 levels on the occupied range, so 256 there). Tensors named in
    ``observed`` keep their observed (min, max) whatever the method. ``base_dir``: where the graph's
    external-data tensors are read from. One session serves both passes.
    """
    if method not in METHODS:
        raise DataError(f"unknown calibration method '{method}': choose one of {', '.join(METHODS)}")
    tensors, chunks, read = _tensor_reader(model, tensors, calibration_batches, base_dir)
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for x in chunks:
        for t, out in read(x):
            lo[t], hi[t] = min(lo[t], float(out.min())), max(hi[t], float(out.max()))
    ranges = {t: (min(lo[t], 0.0), max(hi[t], 0.0)) for t in tensors}
    if method != "minmax":
        hists = {t: _Histogram(*ranges[t]) for t in tensors}
        for x in chunks:
            for t, out in read(x):
                hists[t].add(out)
        pick = (lambda h: _percentile_range(h, percentile)) if method == "percentile" else (lambda h: _entropy_range(h, kl_levels))
        ranges = {t: (ranges[t] if t in observed else pick(hists[t])) for t in tensors}
    images = sum(c.shape[0] for c in chunks)
    return {t: (float(np.float32(a)), float(np.float32(b))) for t, (a, b) in ranges.items()}, images


def collect_channel_ranges(model, tensors: Sequence[str], calibration_batches: Iterable, base_dir=None
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of the named tensors: what outlier folding needs."""
    tensors, chunks, read = _tensor_reader(model, tensors, calibration_batches, base_dir)
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for x in chunks:
        for t, out in read(x):
            flat = out.reshape(-1, out.shape[-1]).astype(np.float64)
            a, b = flat.min(axis=0), flat.max(axis=0)
            lo[t] = np.minimum(lo[t], a) if t in lo else a
            hi[t] = np.maximum(hi[t], b) if t in hi else b
    return {t: (lo[t], hi[t]) for t in tensors}


__all__ = ["METHODS", "collect_ranges", "collect_channel_ranges", "kl_threshold"]
