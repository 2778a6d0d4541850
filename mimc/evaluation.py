"""Evaluation: fidelity of a compressed model's features to a reference, and k-NN top-1.

The measures themselves (:class:`~mimc.metrics.Fidelity`, k-NN top-1) live in :mod:`mimc.metrics`;
this module runs models over images and feeds them. k-NN runs leave-one-out over one labelled set,
so no train/test split is needed for small sets; the reference-model script uses the same function.

A model here is a torch :class:`~mimc.models.vit.Encoder` or an ONNX file written by mimc (its
artifact directory's ``mimc.json`` gives the input spec and pooling).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import torch

from mimc.errors import DataError, NotAModelError
from mimc.metrics import Fidelity, FidelityMeter, knn_top1
from mimc.runtime.onnx_model import OnnxModel

Runner = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


# Models -------------------------------------------------------------------------------------------
def load_for_eval(model: Any):
    """A MODEL argument, an Encoder, or a ``.onnx`` / OpenVINO ``.xml`` path -> something :func:`features` can run."""
    if isinstance(model, (str, os.PathLike)):
        if str(model).endswith((".onnx", ".xml")):
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
    meter = FidelityMeter()
    for x in _batches(images, batch_size):
        p, t = run(x)
        rp, rt = run_ref(x)
        meter.update(p, rp, t, rt)
        feats.append(p)
        ref_feats.append(rp)
    return meter.result(), torch.cat(feats), torch.cat(ref_feats)


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
            report["fidelity"] = fid.to_dict()
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


__all__ = ["features", "fidelity", "compare_features", "evaluate", "load_for_eval"]
