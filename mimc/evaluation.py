"""Evaluation: fidelity of a compressed model's features to a reference, and k-NN top-1.

The measures themselves (:class:`~mimc.metrics.Fidelity`, k-NN top-1) live in :mod:`mimc.metrics`;
this module runs models over images and feeds them. k-NN runs leave-one-out over one labelled set
(no train/test split needed for small sets; the reference-model script uses the same protocol) or,
given a val set, classifies each val image against the labelled data as gallery.

A model here is what :func:`mimc.runtime.runner.open_runner` runs: a torch
:class:`~mimc.models.vit.Encoder`, a MODEL argument, or a graph written by mimc (its artifact
directory's ``mimc.json`` gives the input spec and pooling) on ONNX Runtime, OpenVINO or TensorRT.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from mimc.data.source import ImageSet, ImageSource, input_spec
from mimc.errors import DataError, MimcError, shorten
from mimc.metrics import KNN_K, Fidelity, FidelityMeter, knn_top1
from mimc.runtime.ranks import Ranks
from mimc.runtime.runner import Runner, open_runner

# k-NN blocks of eval: small enough that the similarity block is no larger at 20 000 images than the
# whole matrix at 2 000 (32 MiB), so eval's peak memory does not grow with the set (bench_eval_rss.py).
EVAL_KNN_BLOCK_BYTES = 32 * 2**20


# Models -------------------------------------------------------------------------------------------
def load_for_eval(model: Any, device: str | None = None, threads: int | None = None) -> Runner:
    """An Encoder, a MODEL argument or a graph path (mimc ``.onnx``, OpenVINO ``.xml``, TensorRT
    ``.engine`` / ``.plan``) -> its :class:`~mimc.runtime.runner.Runner` on ``device`` with ``threads``.
    The runner never changes an Encoder's state (no ``eval()``: the canonical encoder has no dropout
    or batch norm, so train and eval mode compute the same thing)."""
    return model if isinstance(model, Runner) else open_runner(model, device, threads)


def _batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, ImageSet):
        images = images.pixels
    return images.split(batch_size) if isinstance(images, torch.Tensor) else images


def _forward(batches: Iterable[torch.Tensor], models: list[Any], meter: FidelityMeter | None = None) -> list[list]:
    """Every model's pooled features, batch by batch; with ``meter``, the first two are candidate and
    reference and their features (tokens too) are compared as they go, so token features of large
    sets never sit in memory at once. Without it only pooled features are asked for."""
    runners = [load_for_eval(m) for m in models]
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner.threads_set())
        for x in batches:
            outs = [runner.forward(x, meter is not None) for runner in runners]
            if meter is not None:
                meter.update(outs[0][0], outs[1][0], outs[0][1], outs[1][1])
            for model_feats, (pooled, _) in zip(feats, outs):
                model_feats.append(pooled)
    return feats


# Features and fidelity ----------------------------------------------------------------------------
def features(model: Any, images: Any, batch_size: int = 32) -> torch.Tensor:
    """Pooled features (N, D) of an Encoder or mimc ONNX file on an ImageSet / tensor / batches."""
    pooled = _forward(_batches(images, batch_size), [model])[0]
    if not pooled:
        raise DataError("no images to compute features on: pass a non-empty data set")
    return torch.cat(pooled)


def fidelity(model: Any, reference: Any, images: Any, batch_size: int = 32) -> Fidelity:
    """Cosine of pooled features (mean, min), per-token cosine when token counts match, and SQNR."""
    return compare_features(model, reference, images, batch_size)[0]


def compare_features(model: Any, reference: Any, images: Any, batch_size: int) -> tuple[Fidelity, torch.Tensor, torch.Tensor]:
    """Fidelity plus both models' pooled features (so k-NN needs no second forward pass)."""
    meter = FidelityMeter()
    feats, ref_feats = _forward(_batches(images, batch_size), [model, reference], meter)
    return meter.result(), torch.cat(feats), torch.cat(ref_feats)


# The eval verb ------------------------------------------------------------------------------------
@dataclass
class Pass:
    """What one streamed pass over a set leaves: each model's pooled features (``feats``, in the
    order of the models), the labels of the images read, their hash — never the images."""

    source: str
    class_names: list[str] | None
    labels: np.ndarray | None
    sha256: str
    feats: list[torch.Tensor]
    digests: list[bytes]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.feats[0])


def stream_pass(stream: Any, source: str, models: list[Any], meter: FidelityMeter | None = None,
                digests: bool = False, shard: bool = False) -> Pass:
    """Run ``models`` over every batch of ``stream`` once (with ``meter``, see :func:`_forward`); a
    ``shard`` (a torchrun rank's share of the set) may be empty."""
    sha, labels, seen = hashlib.sha256(), [], []

    def pixels() -> Iterator[torch.Tensor]:
        for batch in stream:
            x = batch.pixels
            sha.update(x.contiguous().numpy())
            if batch.labels is not None:
                labels.append(batch.labels)
            if digests:
                seen.extend(hashlib.blake2b(xi.contiguous().numpy(), digest_size=16).digest() for xi in x)
            yield x

    feats = _forward(pixels(), models, meter)
    if not feats[0] and not shard:
        raise _no_images(source, getattr(stream, "option", "data"), stream.stats.skipped)
    return Pass(source, stream.class_names, np.concatenate(labels) if labels else None, sha.hexdigest(),
                [torch.cat(f) if f else torch.empty(0) for f in feats], seen, list(stream.stats.skipped))


def _no_images(source: str, option: str, skipped: list[str]) -> DataError:
    """A set with no image to compute features on: every one skipped as unreadable (skip_corrupt), or none there."""
    if skipped:
        return DataError(f"{source}: every image was unreadable and skipped ({len(skipped)}, first {skipped[0]}): "
                         "pass readable images", option=option)
    return DataError(f"{source}: no images to compute features on: pass a non-empty {option} set", option=option)


def joined(shards: list[Pass]) -> Pass:
    """One pass from the torchrun ranks' passes over their contiguous shards, in rank order (the order
    one process reads the set in). ``sha256`` is that of the shards' hashes, in rank order."""
    full = [p for p in shards if len(p)]
    if not full:
        raise _no_images(shards[0].source, "data", [name for p in shards for name in p.skipped])
    return Pass(full[0].source, full[0].class_names,
                np.concatenate([p.labels for p in full]) if full[0].labels is not None else None,
                hashlib.sha256("".join(p.sha256 for p in shards).encode()).hexdigest(),
                [torch.cat(f) for f in zip(*(p.feats for p in full))],
                [d for p in shards for d in p.digests], [name for p in shards for name in p.skipped])


def evaluate(model: Any, reference: Any = None, data: Any = "builtin", n: int | None = None, seed: int = 0, batch_size: int = 32,
             val: Any = None, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Fidelity to ``reference`` (when given) and k-NN top-1 of both (when the data is labelled).

    Without ``val``: k-NN leave-one-out over ``data``, fidelity measured on ``data``. With ``val``
    (train / val protocol, as DINO's k-NN evaluation): ``data`` is the labelled gallery, every val
    image is classified against it, and fidelity is measured on val. ``n`` takes a seeded subset of
    each set. Images stream through in batches (decoded in worker processes); what stays in memory
    is one pooled feature vector per image and model.

    ``world`` > 1 (torchrun: an initialised process group): every rank runs its contiguous shard of
    each set, rank 0 gathers the pooled features and the fidelity sums, computes the report and
    hands it to every rank (``rank`` and ``ranks`` added). The measures are one process's (to float
    rounding); ``sha256`` of a set is then that of its shards' hashes.
    """
    group = Ranks(rank, world) if world > 1 else None
    cand = load_for_eval(model)
    ref = load_for_eval(reference) if reference is not None else None
    sources = {"data": _source(data, seed)}
    if val is not None:
        sources["val"] = _source(val, seed)
    streams = lambda name, m, whole=False: read_images(  # noqa: E731
        sources[name], m.config, n, batch_size, option=name, rank=0 if whole else rank, world=1 if whole else world)
    # bad labels (of the whole sets, whatever the ranks) fail before any forward pass
    knn_labels(streams("data", cand, True), streams("val", cand, True) if val is not None else None)
    shared = ref is not None and input_spec(ref.config) == input_spec(cand.config)
    comparable = shared and ref.config.dim == cand.config.dim
    meter = FidelityMeter() if comparable else None

    def run_set(name: str, with_meter: bool) -> Pass:
        """The set's pass of the candidate and the reference (one pass when they share an input spec)."""
        out = stream_pass(streams(name, cand), sources[name].spec, [cand, ref] if shared else [cand],
                          meter if with_meter else None, digests=val is not None, shard=group is not None)
        if ref is not None and not shared:
            out.feats += stream_pass(streams(name, ref), sources[name].spec, [ref], shard=group is not None).feats
        return out

    try:
        train = run_set("data", with_meter=val is None)
        query = train if val is None else run_set("val", with_meter=True)
    except MimcError as exc:
        if group is not None:
            group.agree(exc)  # the other ranks raise it too instead of waiting for this one
        raise
    if group is None:
        return _report(cand, ref, meter, train, query, val is not None, comparable)
    group.agree(None)
    shards = group.collect((train, query if val is not None else None, meter))
    if rank == 0:
        try:
            train = joined([s[0] for s in shards])
            query = joined([s[1] for s in shards]) if val is not None else train
            if meter is not None:
                for other in shards[1:]:
                    meter.merge(other[2])
            report = _report(cand, ref, meter, train, query, val is not None, comparable)
        except MimcError as exc:
            group.outcome(None, exc)
    report = group.outcome(report if rank == 0 else None, None)
    return {**report, "rank": rank, "ranks": world}


def _report(cand: Any, ref: Any, meter: FidelityMeter | None, train: Pass, query: Pass, has_val: bool,
            comparable: bool) -> dict[str, Any]:
    """The eval report from the passes over the data (and val) set."""
    measured = "val" if has_val else "data"
    # what ran the candidate: torch, or a graph's runtime (onnxruntime-cpu, openvino-cpu for an IR, tensorrt)
    report: dict[str, Any] = {"runtime": getattr(cand, "runtime", "torch"), "data": _describe(train)}
    if has_val:
        report["val"] = _describe(query)
    if ref is not None:
        if comparable:
            report["fidelity"] = meter.result().to_dict()
            report["fidelity_on"] = measured
        else:
            report["fidelity"] = None
            report["fidelity_note"] = "model and reference differ in input spec or width: fidelity undefined, k-NN only"
    skipped = sorted({name for p in (train, query) for name in p.skipped})
    if skipped:
        report["skipped_images"] = skipped
    labels = knn_labels(train, query if has_val else None)
    if labels is None:
        return report
    if len(np.unique(labels[0])) < 2:  # photos in one folder under the data folder: every image "right"
        report["knn_note"] = (f"data has one class ({_class_keys(train, 'data')[0]}): k-NN would call every image right, skipped; "
                              "give data two classes or more")
        return report

    def top1(model: int) -> float:
        """k-NN top-1 of the candidate's (0) or the reference's (1) features (leave-one-out without val)."""
        return knn_top1(train.feats[model], labels[0], queries=query.feats[model] if has_val else None,
                        query_labels=labels[1], block_bytes=EVAL_KNN_BLOCK_BYTES)

    report["knn_top1"] = top1(0)
    if ref is not None:
        report["reference_knn_top1"] = base = top1(1)
        report["knn_retained"] = report["knn_top1"] / base if base > 0 else None
    report["knn_protocol"] = "gallery-query" if has_val else "leave-one-out"
    report["knn_k"] = KNN_K
    report["knn_gallery_size"] = len(train)
    report["knn_query_size"] = len(query)
    if has_val:
        report["knn_val_in_data"] = shared_images(train, query)  # such val images find themselves
    return report


def shared_images(gallery: Pass, queries: Pass) -> int:
    """How many query images are, after preprocessing, bit for bit an image of the gallery."""
    seen = set(gallery.digests)
    return sum(d in seen for d in queries.digests)


def _source(spec: Any, seed: int):
    return spec if isinstance(spec, ImageSource) else ImageSource(spec, seed)


def read_images(source: Any, cfg: Any, n: int | None, batch_size: int = 32, option: str = "data", *,
                rank: int = 0, world: int = 1):
    """The one place evaluation reads images: a stream of the seeded subset of ``n`` (all when None)
    of ``source`` (with ``world`` > 1, this rank's contiguous share), preprocessed for ``cfg``'s input
    spec. An error reading the ``val`` set names ``val``, not ``data`` (also when it surfaces mid-stream)."""
    try:
        return _Named(source.stream(cfg, n, batch_size, rank=rank, world=world), option)
    except DataError as exc:
        raise _renamed(exc, option) from exc


def _renamed(exc: DataError, option: str) -> DataError:
    if option == "data":
        return exc
    message = exc.phrased({"data": option}) if "data" in exc.options else f"{option}: {exc}"
    return DataError(message, option=(option, *(o for o in exc.options if o != "data")))  # e.g. skip_corrupt


class _Named:
    """A stream whose read errors name the option it came from."""

    def __init__(self, stream: Any, option: str):
        self.stream, self.option = stream, option
        self.labels, self.class_names = stream.labels, stream.class_names
        self.sha256 = None  # known after a pass

    @property
    def stats(self):
        return self.stream.stats

    def __iter__(self):
        try:
            yield from self.stream
        except DataError as exc:
            raise _renamed(exc, self.option) from exc


def _describe(images: Pass) -> dict[str, Any]:
    return {"source": images.source, "n_images": len(images), "labelled": images.labels is not None, "sha256": images.sha256}


def knn_labels(gallery: Any, queries: Any = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(gallery labels, query labels) for k-NN, or None when there is nothing to classify.

    Without ``queries``: leave-one-out over the gallery (None when it has no labels). With them,
    both sets must be labelled and are matched by class name where they have names (class
    subfolders, ``class_names`` in a .npz): class 2 of one folder need not be class 2 of the other.
    Every query class must be a gallery class; a val set identical to the gallery is refused.
    """
    if queries is None:
        return None if gallery.labels is None else (np.asarray(gallery.labels), np.asarray(gallery.labels))
    if gallery.labels is None:
        raise DataError("data has no labels, so val images cannot be classified against it: give data class subfolders "
                        "(or a 'labels' array in the .npz)", option=("data", "val"))
    if queries.labels is None:
        raise DataError("val has no labels: give val class subfolders (or a 'labels' array in the .npz), "
                        "or drop val for leave-one-out k-NN on data", option=("val", "data"))
    if queries.sha256 is not None and queries.sha256 == gallery.sha256:
        raise DataError("val holds the same images as data, so every val image would find itself: "
                        "pass a held-out val set, or drop val for leave-one-out k-NN on data", option=("val", "data"))
    keys = {option: _class_keys(images, option) for option, images in (("data", gallery), ("val", queries))}
    if (gallery.class_names is None) != (queries.class_names is None):
        bare = "data" if gallery.class_names is None else "val"
        if keys[bare].dtype.kind in "biuf":
            raise DataError(f"{'data' if bare == 'val' else 'val'} names its classes but {bare} has only numeric labels, so "
                            f"classes cannot be matched: give {bare} class subfolders (or 'class_names' in its .npz)",
                            option=("data", "val"))
        keys = {o: k.astype(str) for o, k in keys.items()}
    missing = sorted(set(keys["val"].tolist()) - set(keys["data"].tolist()), key=str)
    if missing:
        shown = ", ".join(shorten(m, 30) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"val has {len(missing)} class(es) that data lacks ({shown}): k-NN can only predict data's classes; "
                        "give val only classes present in data", option=("val", "data"))
    return keys["data"], keys["val"]


def _class_keys(images: Any, option: str) -> np.ndarray:
    labels = np.asarray(images.labels).reshape(-1)
    names = images.class_names
    if names is None:
        return labels
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() >= len(names))):
        raise DataError(f"{option} labels must be whole numbers indexing its {len(names)} class_names: "
                        f"save labels in 0..{len(names) - 1}", option=option)
    return np.asarray([str(c) for c in names])[labels]


__all__ = ["features", "fidelity", "compare_features", "evaluate", "load_for_eval", "knn_labels", "read_images", "shared_images"]
