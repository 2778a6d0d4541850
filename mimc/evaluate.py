"""Evaluation: fidelity of a compressed model's features to a reference, and k-NN top-1.

References:
- k-NN protocol: weighted k-NN on L2-normalised features as in InstDisc (Wu et al., CVPR 2018)
  and DINO (Caron et al., ICCV 2021; https://github.com/facebookresearch/dino, ``eval_knn.py``):
  cosine similarity, k=10 neighbours, votes weighted by exp(sim / 0.07). mimc runs it
  leave-one-out over one labelled set, so no train/test split is needed for small sets; the
  reference-model script uses exactly this function.
- SQNR / cosine comparisons as in Polygraphy's output comparison.

A model here is a torch :class:`~mimc.models.vit.Encoder` or an ONNX file written by mimc (its
artifact directory's ``mimc.json`` gives the input spec and pooling).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mimc.errors import DataError, NotAModelError

KNN_K = 10
SQNR_CAP_DB = 200.0  # the same cap as mimc.deploy.validate
KNN_TEMPERATURE = 0.07

Runner = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


# Models -------------------------------------------------------------------------------------------
class OnnxModel:
    """An ONNX graph written by mimc, run on ONNX Runtime CPU; ``config`` comes from its artifact."""

    def __init__(self, path: str | os.PathLike):
        from mimc.artifact import is_artifact, read_manifest
        from mimc.models.vit import EncoderConfig

        self.path = Path(path)
        if not self.path.is_file():
            raise NotAModelError(f"ONNX file {self.path} does not exist: export one with `mimc export MODEL`")
        if not is_artifact(self.path.parent):
            raise NotAModelError(
                f"{self.path} was not written by mimc (no mimc.json beside it, so its input spec is unknown): "
                "export it with `mimc export MODEL` or evaluate the source model"
            )
        self.manifest = read_manifest(self.path.parent)
        self.config = EncoderConfig.from_dict(self.manifest.encoder)
        self._session = None

    def session(self):
        if self._session is None:
            from mimc.deploy.validate import make_session

            # mimc's session options: no spinning threads stealing cores from the torch reference.
            self._session = make_session(self.path)
        return self._session

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from mimc.deploy.validate import run_onnx

        sess = self.session()
        inp = sess.get_inputs()[0]
        np_dtype = np.float16 if "float16" in inp.type else np.float32
        static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        chunks = [x] if static_batch is None else list(x.split(static_batch))
        pooled, tokens = [], []
        for chunk in chunks:
            n = chunk.shape[0]
            if static_batch is not None and n < static_batch:  # pad a short last batch, trim after
                chunk = torch.cat([chunk, chunk[-1:].expand(static_batch - n, *chunk.shape[1:])])
            p, t = self._split_outputs(run_onnx(sess, chunk.numpy().astype(np_dtype)))
            pooled.append(p[:n])
            if t is not None:
                tokens.append(t[:n])
        return torch.cat(pooled), (torch.cat(tokens) if tokens else None)

    def _split_outputs(self, outs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pooled`` and ``last_hidden_state`` by name (mimc's export), else by rank."""
        values = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in outs.items()}
        pooled = values.get("pooled")
        tokens = values.get("last_hidden_state")
        if pooled is None:
            pooled = next((v for v in values.values() if v.dim() == 2), None)
        if tokens is None:
            tokens = next((v for v in values.values() if v.dim() == 3), None)
        if pooled is None:
            raise NotAModelError(f"{self.path} has no pooled (batch, dim) output: re-export it with `mimc export`")
        return pooled, tokens


def load_for_eval(model: Any):
    """A MODEL argument, an Encoder, or a ``.onnx`` path -> something :func:`features` can run."""
    if isinstance(model, (str, os.PathLike)):
        if str(model).endswith(".onnx"):
            return OnnxModel(model)
        from mimc.models.resolve import load_model

        return load_model(str(model))
    return model


def _runner(model: Any) -> Runner:
    if isinstance(model, OnnxModel):
        return model
    if isinstance(model, torch.nn.Module):
        # No model.eval() here: evaluation must not change its input's state, and the canonical
        # encoder has no dropout or batch norm, so train and eval mode compute the same thing.

        @torch.no_grad()
        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = model(x)
            return out.pooled.float(), out.last_hidden_state.float()

        return run
    raise NotAModelError(f"cannot evaluate a {type(model).__name__}: pass an Encoder, a MODEL argument or a .onnx file")


def _batches(images: Any, batch_size: int) -> Iterator[torch.Tensor]:
    from mimc.data import ImageSet

    if isinstance(images, ImageSet):
        yield from images.batches(batch_size)
    elif isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
    else:
        yield from images


# Features and fidelity ----------------------------------------------------------------------------
def features(model: Any, images: Any, batch_size: int = 32) -> torch.Tensor:
    """Pooled features (N, D) of an Encoder or mimc ONNX file on an ImageSet / tensor / batches."""
    run = _runner(load_for_eval(model))
    pooled = [run(x)[0] for x in _batches(images, batch_size)]
    if not pooled:
        raise DataError("no images to compute features on: pass a non-empty data set")
    return torch.cat(pooled)


@dataclass
class Fidelity:
    """How close a candidate's features are to a reference's on the same inputs."""

    pooled_cosine_mean: float
    pooled_cosine_min: float
    sqnr_db: float  # pooled features: 10 log10(|ref|^2 / |ref - cand|^2)
    token_cosine_mean: float | None
    token_cosine_min: float | None
    n_images: int
    note: str | None = None

    def summary(self, digits: int = 6) -> dict[str, Any]:
        return {k: (round(v, digits) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def fidelity(model: Any, reference: Any, images: Any, batch_size: int = 32) -> Fidelity:
    """Cosine of pooled features (mean, min), per-token cosine when token counts match, and SQNR.

    Streams batch by batch so token features of large sets never sit in memory at once.
    """
    return compare_features(model, reference, images, batch_size)[0]


def compare_features(model: Any, reference: Any, images: Any, batch_size: int) -> tuple[Fidelity, torch.Tensor, torch.Tensor]:
    """Fidelity plus both models' pooled features (so k-NN needs no second forward pass)."""
    run, run_ref = _runner(load_for_eval(model)), _runner(load_for_eval(reference))
    feats: list[torch.Tensor] = []
    ref_feats: list[torch.Tensor] = []
    pooled_cos: list[torch.Tensor] = []
    token_cos: list[torch.Tensor] = []
    signal = noise = 0.0
    note = None
    compare_tokens = True
    for x in _batches(images, batch_size):
        p, t = run(x)
        rp, rt = run_ref(x)
        if p.shape != rp.shape:
            raise DataError(f"pooled features have shapes {tuple(p.shape)} vs the reference's {tuple(rp.shape)}: compare models of the same width")
        feats.append(p)
        ref_feats.append(rp)
        pooled_cos.append(F.cosine_similarity(p.double(), rp.double(), dim=-1))
        signal += float(rp.double().pow(2).sum())
        noise += float((rp.double() - p.double()).pow(2).sum())
        if compare_tokens and t is not None and rt is not None and t.shape == rt.shape:
            token_cos.append(F.cosine_similarity(t.double(), rt.double(), dim=-1).flatten())
        elif compare_tokens:
            compare_tokens = False
            token_cos.clear()
            if t is None or rt is None:
                note = "a model has no token output: pooled features compared only"
            else:
                note = f"candidate has {t.shape[1]} tokens vs the reference's {rt.shape[1]}: per-token cosine undefined, pooled features compared only"
    if not pooled_cos:
        raise DataError("no images to compare on: pass a non-empty data set")
    cos = torch.cat(pooled_cos)
    tok = torch.cat(token_cos) if token_cos else None
    # Identical features have infinite SQNR; JSON has no infinity, so cap as export validation does.
    sqnr = min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)) if noise > 0 else SQNR_CAP_DB
    result = Fidelity(
        pooled_cosine_mean=float(cos.mean()),
        pooled_cosine_min=float(cos.min()),
        sqnr_db=sqnr,
        token_cosine_mean=float(tok.mean()) if tok is not None else None,
        token_cosine_min=float(tok.min()) if tok is not None else None,
        n_images=int(cos.numel()),
        note=note,
    )
    return result, torch.cat(feats), torch.cat(ref_feats)


# k-NN ---------------------------------------------------------------------------------------------
def knn_predictions(feats: torch.Tensor | np.ndarray, labels: Iterable[int], k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Leave-one-out weighted k-NN prediction for every sample (labels in, labels out)."""
    feats = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    labels_np = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels))
    n = feats.shape[0]
    if n < 2 or labels_np.shape[0] != n:
        raise DataError(f"k-NN needs at least 2 labelled images with one label each (got {n} images, {labels_np.shape[0]} labels)")
    classes, inverse = np.unique(labels_np, return_inverse=True)  # any label values -> 0..C-1
    labels_t = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    f = F.normalize(feats, dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))  # leave one out: an image never votes for itself
    k = min(k, n - 1)
    top_sim, top_idx = sim.topk(k, dim=-1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(n, len(classes), dtype=torch.float64)
    votes.scatter_add_(1, labels_t[top_idx], weights)
    return classes[votes.argmax(dim=-1).numpy()]


def knn_top1(feats: torch.Tensor | np.ndarray, labels: Iterable[int], k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Leave-one-out weighted k-NN top-1 on L2-normalised features (cosine, k=10, exp(sim/0.07))."""
    labels_np = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels))
    return float((knn_predictions(feats, labels_np, k, temperature) == labels_np).mean())


# The eval verb ------------------------------------------------------------------------------------
def evaluate(model: Any, reference: Any = None, data: Any = "builtin", n: int | None = None, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Fidelity to ``reference`` (when given) and k-NN top-1 of both (when the data is labelled)."""
    from mimc.data import ImageSource

    source = data if isinstance(data, ImageSource) else ImageSource(data, seed)
    cand = load_for_eval(model)
    ref = load_for_eval(reference) if reference is not None else None
    images = source.draw(cand.config, n)
    report: dict[str, Any] = {
        "data": {"source": images.source, "n_images": len(images), "labelled": images.labels is not None, "sha256": images.sha256},
    }
    cand_feats = ref_feats = None
    if ref is not None:
        same_spec = _input_spec(ref.config) == _input_spec(cand.config)
        if same_spec and ref.config.dim == cand.config.dim:
            fid, cand_feats, ref_feats = compare_features(cand, ref, images, batch_size)
            report["fidelity"] = fid.summary()
        else:
            report["fidelity"] = None
            report["fidelity_note"] = "model and reference differ in input spec or width: fidelity undefined, k-NN only"
    if images.labels is not None:
        if cand_feats is None:
            cand_feats = features(cand, images, batch_size)
        report["knn_top1"] = knn_top1(cand_feats, images.labels)
        if ref is not None:
            if ref_feats is None:
                ref_images = source.draw(ref.config, n)
                ref_feats = features(ref, ref_images, batch_size)
            report["reference_knn_top1"] = knn_top1(ref_feats, images.labels)
            base = report["reference_knn_top1"]
            report["knn_retained"] = report["knn_top1"] / base if base > 0 else None
    return report


def _input_spec(cfg) -> tuple:
    return (tuple(cfg.input_shape), tuple(cfg.image_mean), tuple(cfg.image_std))


__all__ = ["OnnxModel", "Fidelity", "features", "fidelity", "compare_features", "knn_top1", "knn_predictions", "evaluate", "load_for_eval"]
