"""Fidelity of a candidate's features to a reference's, measured one way everywhere; k-NN top-1.

:class:`FidelityMeter` streams batches (candidate and reference pooled features, and token features
when both have them) and keeps only running sums, so memory does not grow with the number of images;
:func:`compare_outputs` measures named graph outputs in one go. Both return a :class:`Fidelity`,
whose ``to_dict()`` is the one spelling of the keys in every report.

Formulas (float64 throughout):
- cosine of two vectors: a·b / (|a| |b|); two zero vectors agree (1.0), one zero vector does not (0.0).
- pooled cosine: per image; token cosine: per token (over the feature axis).
- image cosine: per image over everything compared, each image's output flattened; the worst is
  ``image_cosine_min``, what the per-precision gates judge.
- SQNR: 10 log10(Σref² / Σ(ref−cand)²), capped at ±200 dB (JSON has no infinity).

References:
- Polygraphy (NVIDIA/TensorRT, tools/Polygraphy): output comparison by absolute error, cosine
  similarity or signal-to-noise ratio.
- SQNR as the quantization fidelity measure: Nagel et al., "A White Paper on Neural Network
  Quantization", arXiv 2106.08295 (2021).
- k-NN protocol: weighted k-NN on L2-normalised features as in InstDisc (Wu et al., CVPR 2018)
  and DINO (Caron et al., ICCV 2021; https://github.com/facebookresearch/dino, ``eval_knn.py``):
  cosine similarity, k=10 neighbours, votes weighted by exp(sim / 0.07), run leave-one-out over one
  labelled set or, as there, with a train gallery and val queries; queries in blocks, so memory stays
  bounded at any N (never the N x N matrix).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mimc.errors import BadInputError, ConfigError, DataError

# Outputs that agree bit for bit have infinite SQNR; JSON has no infinity, so reports cap it here.
SQNR_CAP_DB = 200.0
KNN_K = 10
KNN_TEMPERATURE = 0.07
KNN_BLOCK_BYTES = 256 * 2**20  # one block of query x gallery similarities (float64)
# Fields kept exact in to_dict(): absolute errors of ~1e-6 are what the fp32 gate reads.
_EXACT = ("max_abs", "ref_max_abs")


@dataclass(frozen=True)
class Fidelity:
    """How close a candidate's features are to a reference's on the same inputs (None: not measured)."""

    pooled_cosine_mean: float | None = None
    pooled_cosine_min: float | None = None
    token_cosine_mean: float | None = None  # per token
    token_cosine_min: float | None = None
    image_cosine_min: float | None = None  # worst image over every compared output (the gated cosine)
    sqnr_db: float | None = None  # pooled features
    token_sqnr_db: float | None = None
    max_abs: float | None = None  # over every compared output
    ref_max_abs: float | None = None  # largest |reference|: scales the fp32 gate
    n_images: int = 0
    note: str | None = None

    @property
    def worst_sqnr_db(self) -> float | None:
        """The lowest SQNR over the compared outputs (what the gates judge)."""
        values = [v for v in (self.sqnr_db, self.token_sqnr_db) if v is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """The report form; cosines and SQNR rounded to 6 decimals, absolute errors exact."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None  # JSON has no infinity: the note says why (non-finite outputs)
            elif k not in _EXACT and isinstance(v, float):
                out[k] = round(v, 6)
        return out


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB, capped at ±SQNR_CAP_DB (the floor when either is not finite)."""
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return -SQNR_CAP_DB
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise))


def cosine_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine of every row of two (N, D) float64 arrays."""
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    dots = np.sum(ref * cand, axis=1)
    same = np.all(ref == cand, axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(same, 1.0, 0.0))


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _abs_max(x: np.ndarray) -> float:
    """The largest |x|, a NaN counting as inf (Python's max keeps its first argument over a NaN)."""
    top = float(np.max(np.abs(x)))
    return math.inf if math.isnan(top) else top


def _per_image(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


class _Sums:
    """Running sums of one kind of feature (pooled or token)."""

    def __init__(self) -> None:
        self.cos_sum = 0.0
        self.cos_count = 0
        self.cos_min = math.inf
        self.image_min = math.inf
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.ref_max_abs = 0.0
        self.nonfinite = 0  # NaN / inf values in the outputs compared (either side)

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        rows_ref = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(1, -1)
        cos = cosine_rows(rows_ref, cand.reshape(rows_ref.shape))
        if cos.size:
            self.cos_sum += float(np.sum(cos))
            self.cos_count += int(cos.size)
            self.cos_min = min(self.cos_min, float(np.min(cos)))
        image = cosine_rows(_per_image(ref), _per_image(cand))
        if image.size:
            self.image_min = min(self.image_min, float(np.min(image)))
        diff = cand - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(diff * diff))
        self.nonfinite += int(diff.size - np.count_nonzero(np.isfinite(diff)))
        if diff.size:
            self.max_abs = max(self.max_abs, _abs_max(diff))
            self.ref_max_abs = max(self.ref_max_abs, _abs_max(ref))

    def merge(self, other: "_Sums") -> None:
        for key in ("cos_sum", "cos_count", "signal", "noise", "nonfinite"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for key, pick in (("cos_min", min), ("image_min", min), ("max_abs", max), ("ref_max_abs", max)):
            setattr(self, key, pick(getattr(self, key), getattr(other, key)))


class FidelityMeter:
    """Streams batches into a :class:`Fidelity`; memory stays constant in the number of images.

    Token features are compared while both sides have them with the same shape; the first batch where
    they do not drops the token measures for the whole run and says why in ``note``.
    """

    def __init__(self) -> None:
        self._pooled = _Sums()
        self._tokens: _Sums | None = _Sums()
        self._images = 0
        self._pooled_seen = False
        self.note: str | None = None

    def update(self, pooled: Any, ref_pooled: Any, tokens: Any = None, ref_tokens: Any = None) -> None:
        """One batch: candidate and reference pooled features (N, D), optionally tokens (N, T, D).

        ``pooled`` None: a graph without a pooled output (generic graph outputs), tokens compared only.
        """
        if pooled is not None:
            p, rp = _as_numpy(pooled), _as_numpy(ref_pooled)
            if p.shape != rp.shape:
                raise DataError(f"pooled features have shapes {tuple(p.shape)} vs the reference's {tuple(rp.shape)}: "
                                "compare models of the same width")
            self._pooled.add(rp, p)
            self._pooled_seen = True
            self._images += int(_per_image(rp).shape[0])
        if self._tokens is None:
            return
        if tokens is not None and ref_tokens is not None and tuple(tokens.shape) == tuple(ref_tokens.shape):
            rt = _as_numpy(ref_tokens)
            self._tokens.add(rt, _as_numpy(tokens))
            if not self._pooled_seen:
                self._images += int(rt.shape[0]) if rt.ndim else 1
            return
        self._tokens = None
        if tokens is None or ref_tokens is None:
            self.note = "a model has no token output: pooled features compared only"
        else:
            self.note = (f"candidate has {tokens.shape[1]} tokens vs the reference's {ref_tokens.shape[1]}: "
                         "per-token cosine undefined, pooled features compared only")

    def merge(self, other: "FidelityMeter") -> None:
        """Take in the images ``other`` saw (another torchrun rank's share of the set)."""
        self._pooled.merge(other._pooled)
        self._pooled_seen |= other._pooled_seen
        self._images += other._images
        if self._tokens is not None and other._tokens is not None:
            self._tokens.merge(other._tokens)
        elif self._tokens is not None:
            self._tokens, self.note = None, other.note

    def result(self) -> Fidelity:
        if self._images == 0:
            raise DataError("no images to compare on: pass a non-empty data set")
        p, t = self._pooled, self._tokens if self._tokens is not None and self._tokens.cos_count else None
        parts = [s for s in (p if self._pooled_seen else None, t) if s is not None]
        nonfinite = sum(s.nonfinite for s in parts)
        note = "; ".join(filter(None, [self.note, nonfinite and f"{nonfinite} non-finite values (NaN/inf) in the outputs: "
                                       "the model overflows or is broken; max_abs is infinite, SQNR at its floor"]))
        return Fidelity(
            pooled_cosine_mean=p.cos_sum / p.cos_count if self._pooled_seen else None,
            pooled_cosine_min=p.cos_min if self._pooled_seen else None,
            token_cosine_mean=t.cos_sum / t.cos_count if t else None,
            token_cosine_min=t.cos_min if t else None,
            image_cosine_min=min((s.image_min for s in parts), default=1.0),
            sqnr_db=sqnr_db(p.signal, p.noise) if self._pooled_seen else None,
            token_sqnr_db=sqnr_db(t.signal, t.noise) if t else None,
            max_abs=max(s.max_abs for s in parts),
            ref_max_abs=max(s.ref_max_abs for s in parts),
            n_images=self._images,
            note=note or None,
        )


# Named outputs (graphs, EncoderOutput) --------------------------------------------------------------
def _as_mapping(outputs: Any) -> dict[str, Any]:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    if isinstance(outputs, Sequence) and not isinstance(outputs, (str, bytes)) and not hasattr(outputs, "shape"):
        fields = getattr(outputs, "_fields", None)  # EncoderOutput and other NamedTuples keep their names
        names = fields if fields else [f"output_{i}" for i in range(len(outputs))]
        return {n: o for n, o in zip(names, outputs) if o is not None}
    return {"output": outputs}


def _unnamed(outputs: dict[str, Any]) -> bool:
    return all(k == "output" or k.startswith("output_") for k in outputs)


def compare_outputs(reference: Any, candidate: Any) -> Fidelity:
    """Fidelity of ``candidate`` outputs to ``reference`` outputs on the same inputs.

    Both may be one array/tensor, a sequence or NamedTuple of them, or a name -> array mapping;
    outputs are matched by name (by position for plain sequences). ``last_hidden_state`` (or any
    other 3-D output) is token features; ``pooled`` (or any other output) is per-image features.
    """
    ref_map, cand_map = _as_mapping(reference), _as_mapping(candidate)
    if set(ref_map) != set(cand_map):
        if len(ref_map) == len(cand_map) and (_unnamed(ref_map) or _unnamed(cand_map)):
            cand_map = dict(zip(ref_map, cand_map.values()))  # plain sequences: match by position
        else:
            raise BadInputError(
                f"outputs differ: reference has {sorted(ref_map)}, candidate has {sorted(cand_map)}: compare graphs with the same outputs"
            )
    pooled, tokens = [], []
    for name, ref in ref_map.items():
        r, c = _as_numpy(ref), _as_numpy(cand_map[name])
        if r.shape != c.shape:
            raise BadInputError(f"output '{name}' has shape {c.shape}, reference {r.shape}: the graph does not match the model")
        is_tokens = name == "last_hidden_state" or (name != "pooled" and r.ndim == 3)
        (tokens if is_tokens else pooled).append((c, r))
    if len(pooled) > 1 or len(tokens) > 1:
        raise BadInputError(f"outputs {sorted(ref_map)} hold more than one pooled or token output: compare them one at a time")
    meter = FidelityMeter()
    p, rp = pooled[0] if pooled else (None, None)
    t, rt = tokens[0] if tokens else (None, None)
    meter.update(p, rp, t, rt)
    if not tokens:
        meter.note = None  # nothing was dropped: there were no token outputs to compare
    return meter.result()


# k-NN ---------------------------------------------------------------------------------------------
def _label_array(labels: Iterable[Any]) -> np.ndarray:
    return np.asarray(labels if isinstance(labels, np.ndarray) else list(labels)).reshape(-1)


def _unit_rows(feats: Any, what: str):
    """A float64 copy of (N, D) features with every row L2-normalised, computed as F.normalize does
    (x / max(|x|, 1e-12), the same bits) but in place: one copy of the features, not two."""
    import torch

    x = feats.detach() if isinstance(feats, torch.Tensor) else torch.as_tensor(np.asarray(feats))
    x = x.to("cpu", torch.float64, copy=True)  # always a copy: the caller's array is never changed
    if x.ndim != 2:
        raise DataError(f"k-NN {what} must be a 2-D (images, features) array, got shape {tuple(x.shape)}")
    return x.div_(x.norm(dim=-1, keepdim=True).clamp_min_(1e-12))


def knn_block_rows(n_gallery: int, block_bytes: int = KNN_BLOCK_BYTES) -> int:
    """Queries per block: a block of (rows, n_gallery) float64 similarities stays within ``block_bytes``
    (at least one row: a gallery of more than ``block_bytes / 8`` images overruns it by that one row)."""
    return max(1, int(block_bytes) // (8 * max(1, n_gallery)))


def knn_predictions(feats: Any, labels: Iterable[Any], k: int = KNN_K, temperature: float = KNN_TEMPERATURE, *,
                    queries: Any = None, block_bytes: int = KNN_BLOCK_BYTES) -> np.ndarray:
    """Weighted k-NN predictions (labels in, labels out) without ever holding all similarities.

    ``feats`` / ``labels`` are the labelled gallery. Without ``queries``: leave-one-out, one prediction
    per gallery image, its own similarity set to -inf so it never votes for itself. With ``queries``
    (M, D): one prediction per query against the whole gallery (the usual train-gallery / val-query
    protocol). Cosine of L2-normalised float64 features; the ``k`` most similar gallery images vote
    with weight exp(sim / temperature); the class with the most weight wins, a tie in votes going to
    the class that sorts first.

    Queries are taken ``knn_block_rows`` at a time, so memory is one (rows, gallery) similarity block
    of at most ``block_bytes`` (256 MiB by default) plus one float64 copy of the features. Each block
    row is a whole gallery row, so ``torch.topk`` ranks the same row as in the N x N matrix
    (:func:`knn_predictions_dense`) and breaks ties among equal similarities the same way. One caveat:
    the BLAS may round a block's dot products differently in the last bit from the whole product's
    (MKL: up to ~1e-15), so two neighbours (or two classes' votes) closer than that could swap;
    exactly tied ones cannot, and the tests and ``benchmarks/bench_knn.py`` find identical predictions.
    """
    import torch

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a whole number >= 1, got {k!r}", option="k")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}", option="temperature")
    labels_np = _label_array(labels)
    gallery = _unit_rows(feats, "features")
    n = gallery.shape[0]
    loo = queries is None
    if labels_np.shape[0] != n or n < (2 if loo else 1):
        need = "at least 2 labelled images" if loo else "at least 1 labelled gallery image"
        raise DataError(f"k-NN needs {need} with one label each (got {n} images, {labels_np.shape[0]} labels)")
    q = gallery if loo else _unit_rows(queries, "queries")
    if q.shape[1] != gallery.shape[1]:
        raise DataError(f"k-NN queries have {q.shape[1]} features but the gallery has {gallery.shape[1]}: "
                        "compute both with the same model")
    classes, inverse = np.unique(labels_np, return_inverse=True)  # any label values -> 0..C-1
    labels_t = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    k = min(int(k), n - 1 if loo else n)
    rows = knn_block_rows(n, block_bytes)
    predicted = np.empty(q.shape[0], dtype=np.int64)
    for start in range(0, q.shape[0], rows):
        sim = q[start : start + rows] @ gallery.T  # (rows, n): the only O(n) per-query memory
        if loo:
            here = torch.arange(sim.shape[0])
            sim[here, here + start] = -float("inf")  # leave one out: an image never votes for itself
        top_sim, top_idx = sim.topk(k, dim=-1)
        del sim
        votes = torch.zeros(top_sim.shape[0], len(classes), dtype=torch.float64)
        votes.scatter_add_(1, labels_t[top_idx], (top_sim / temperature).exp())
        predicted[start : start + rows] = votes.argmax(dim=-1).numpy()
    return classes[predicted]


def knn_predictions_dense(feats: Any, labels: Iterable[Any], k: int = KNN_K, temperature: float = KNN_TEMPERATURE, *,
                          queries: Any = None) -> np.ndarray:
    """The reference :func:`knn_predictions` is checked against: the whole (queries, gallery)
    similarity matrix at once (N x N leave-one-out), O(N²) memory; for tests and benchmarks only."""
    import torch
    import torch.nn.functional as F

    labels_np = _label_array(labels)
    f = F.normalize(torch.as_tensor(np.asarray(feats), dtype=torch.float64), dim=-1)
    q = f if queries is None else F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float64), dim=-1)
    classes, inverse = np.unique(labels_np, return_inverse=True)
    labels_t = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    sim = q @ f.T
    if queries is None:
        sim.fill_diagonal_(-float("inf"))
    top_sim, top_idx = sim.topk(min(k, f.shape[0] - (1 if queries is None else 0)), dim=-1)
    votes = torch.zeros(q.shape[0], len(classes), dtype=torch.float64)
    votes.scatter_add_(1, labels_t[top_idx], (top_sim / temperature).exp())
    return classes[votes.argmax(dim=-1).numpy()]


def knn_top1(feats: Any, labels: Iterable[Any], k: int = KNN_K, temperature: float = KNN_TEMPERATURE, *,
             queries: Any = None, query_labels: Iterable[Any] | None = None, block_bytes: int = KNN_BLOCK_BYTES) -> float:
    """Weighted k-NN top-1 on L2-normalised features (cosine, k=10, exp(sim/0.07)): leave-one-out over
    ``feats`` / ``labels``, or, with ``queries`` and ``query_labels``, of the queries against that gallery."""
    if queries is None:
        truth = _label_array(labels)
    else:
        if query_labels is None:
            raise DataError("k-NN queries have no labels: pass query_labels, one per query")
        truth = _label_array(query_labels)
        if truth.shape[0] != len(queries) or truth.shape[0] == 0:
            raise DataError(f"k-NN needs one label per query and at least one query (got {len(queries)} queries, "
                            f"{truth.shape[0]} labels)")
    predicted = knn_predictions(feats, labels, k, temperature, queries=queries, block_bytes=block_bytes)
    return float((predicted == truth).mean())


__all__ = ["Fidelity", "FidelityMeter", "compare_outputs", "cosine_rows", "sqnr_db", "knn_predictions", "knn_top1",
           "knn_predictions_dense", "knn_block_rows", "SQNR_CAP_DB", "KNN_K", "KNN_TEMPERATURE", "KNN_BLOCK_BYTES"]
