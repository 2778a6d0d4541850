"""Embedding: run a (compressed) encoder over a data source in batches and stream its features to disk
(what ``mimc embed`` does is in README.md, "Embed").

The model runs through the runtime layer's own session (:func:`mimc.runtime.runner.open_runner`), the
images come from :meth:`mimc.data.ImageSource.stream`, the files are written by
:mod:`mimc.data.feature_files` under :func:`mimc.atomic.atomic_files`.

Under torchrun (``gather=True`` with a process group of ``world`` > 1) ranks other than 0 spool their
rows to an unlinked temporary file, then send them to rank 0 in batches over ``torch.distributed``,
and rank 0 writes ONE output in source order. Without a process group, ``rank`` / ``world`` embed
just that shard into ``output`` (the rows of the shards, concatenated in rank order, are the whole
request's).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mimc.atomic import atomic_files, check_new_files, check_not_input
from mimc.data.feature_files import NpyWriter, ParquetWriter, check_index_replaceable, output_paths, pyarrow, writing
from mimc.data.source import ImageSource
from mimc.errors import ConfigError, DataError, MimcError, whole
from mimc.options import check_batch_size
from mimc.runtime.ranks import Ranks
from mimc.runtime.runner import Runner, open_runner

Progress = Callable[[int, int], None]  # (images done, images requested)


# The loop -----------------------------------------------------------------------------------------
@dataclass
class ShardResult:
    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    row_shape: tuple[int, ...] | None = None


def embed_rows(embedder: Runner, stream, write: Callable[..., None], tokens: bool, total: int,
               on_progress: Progress | None = None) -> ShardResult:
    """Run ``embedder`` over every batch of ``stream`` and hand each one's rows to ``write``
    (features, positions, names, labels). The stream's workers decode the next batches meanwhile."""
    result = ShardResult()
    with embedder.threads_set():
        for batch in stream:
            feats = embedder.run(batch.pixels, tokens)
            write(feats, batch.positions, batch.names, batch.labels)
            result.rows += len(feats)
            result.row_shape = tuple(feats.shape[1:])
            if on_progress is not None:
                on_progress(result.rows + len(stream.stats.skipped), total)
    result.skipped = list(stream.stats.skipped)
    return result


# The verb ------------------------------------------------------------------------------------------
def embed(model: Any, data: Any, output: str | os.PathLike, *, tokens: bool = False, n: int | None = None, seed: int = 0,
          batch_size: int | None = None, workers: int | None = None, skip_corrupt: bool = False,
          image_column: str | None = None, label_column: str | None = None, device: str | None = None,
          threads: int | None = None, overwrite: bool = False, on_progress: Progress | None = None,
          rank: int = 0, world: int = 1, gather: bool = False) -> dict[str, Any]:
    """Features of ``model`` on ``data`` written to ``output`` (``.npy`` + ``.json`` index, or ``.parquet``).

    ``batch_size`` None: a static-batch graph's batch, else 32. ``rank`` / ``world``: embed only that
    contiguous shard of the request; with ``gather`` (torchrun: a process group of ``world`` ranks)
    every rank embeds its shard and rank 0 writes one output. Returns the report's body."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not one of the {world} ranks 0..{world - 1}", option="rank")
    group = Ranks(rank, world) if gather and world > 1 else None
    writes = rank == 0 or group is None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            job = _prepare(model, data, output, tokens, n, seed, batch_size, workers, skip_corrupt, image_column,
                           label_column, device, threads, overwrite, rank, world, writes, group is not None)
            writer = None
            if writes:
                tmps = stack.enter_context(atomic_files(job.files, overwrite))
                writer = (NpyWriter(tmps[0], tmps[1], job.capacity, job.head) if job.fmt == "npy"
                          else ParquetWriter(tmps[0], job.head))
                stack.callback(writer.abort)  # closes the temporaries' handles; a no-op once written
        except MimcError as exc:
            if group is not None:
                group.agree(exc)  # the other ranks raise too instead of waiting for this one
            raise
        if group is not None:
            group.agree(None)
        if writes:
            def write(*rows):
                with writing(job.files[0]):
                    writer.write(*rows)
        else:  # an unlinked temporary file (nothing is left behind, however the process ends), sent to rank 0 after
            spool_dir, positions = job.files[0].parent, []
            spool = stack.enter_context(tempfile.TemporaryFile(dir=spool_dir if spool_dir.is_dir() else None))

            def write(feats, pos, names, labels):
                np.ascontiguousarray(feats, dtype=np.float32).tofile(spool)
                positions.append(np.asarray(pos, dtype=np.int64))
        loop_start = time.perf_counter()
        try:
            shard = embed_rows(job.embedder, job.stream, write, tokens, len(job.stream.positions),
                               on_progress if writes else None)
        except MimcError as exc:
            if group is not None:
                group.agree(exc)
            raise
        if not writes:
            return _send_shard(group, job, shard, spool, positions)
        try:
            others = _receive(group, job, writer, shard) if group is not None else []
            loop_seconds = time.perf_counter() - loop_start
            rows = shard.rows + sum(o.rows for o in others)
            skipped = shard.skipped + [name for o in others for name in o.skipped]
            row_shape = shard.row_shape or next((o.row_shape for o in others if o.row_shape), None)
            if rows == 0:
                raise DataError(f"{job.source.spec}: every image was unreadable and skipped: pass readable images", option="data")
            with writing(job.files[0]):
                writer.close({"images": rows, "skipped": len(skipped), "skipped_names": skipped, "shape": [rows, *row_shape]})
            stack.close()  # the files are placed here (or the output is refused as taken meanwhile)
        except MimcError as exc:
            if group is not None and not getattr(exc, "agreed", False):
                group.outcome(None, exc)
            raise
    seconds = time.perf_counter() - start
    body = {"model": job.model_name, "runtime": job.embedder.runtime, "device": job.embedder.device,
            "output": str(job.files[0]), "index": str(job.files[1]) if len(job.files) > 1 else None, "format": job.fmt,
            "source": job.source.spec, "tokens": tokens, "n": n, "images": rows, "skipped": len(skipped),
            "skipped_names": skipped[:20], "seconds": round(seconds, 3),
            "images_per_second": round(rows / loop_seconds, 2) if loop_seconds > 0 else None, "feature_shape": list(row_shape),
            "shape": [rows, *row_shape], "batch_size": job.batch_size, "threads": job.embedder.threads,
            "workers": job.stream.workers, "rank": rank, "world": world, "written": True}
    if group is not None:
        group.outcome(body, None)
    return body


@dataclass
class _Job:
    embedder: Runner
    source: Any
    stream: Any
    files: list[Path]
    fmt: str
    head: dict[str, Any]
    capacity: int
    batch_size: int
    model_name: str


def _prepare(model, data, output, tokens, n, seed, batch_size, workers, skip_corrupt, image_column, label_column,
             device, threads, overwrite, rank, world, writes, gathered) -> _Job:
    """Every check before any image is read: options, outputs (where this rank writes), the model's
    session, the source."""
    if batch_size is not None:
        check_batch_size(batch_size)
    if n is not None and (not whole(n) or n < 1):
        raise ConfigError(f"n must be a positive number of images (or none for all), got {n!r}", option="n")
    given = [k for k, v in (("workers", workers is not None), ("skip_corrupt", skip_corrupt), ("image_column", image_column),
                            ("label_column", label_column)) if v]
    if isinstance(data, ImageSource) and given:
        raise ConfigError(f"data is an ImageSource, which carries its own reading options: give them to the ImageSource "
                          f"(ImageSource(spec, {given[0]}=...)) or pass its spec", option=given[0])
    features_path, index_path, fmt = output_paths(output)
    if fmt == "parquet" and writes:
        pyarrow()
    files = [features_path] + ([index_path] if index_path is not None else [])
    if writes:
        spec = data.spec if isinstance(data, ImageSource) else data
        for path in files:
            check_not_input(path, [spec], option="output")
            if isinstance(model, (str, os.PathLike)):  # beside the model in its artifact folder is fine
                check_not_input(path, [model], option="output", inside=False)
        check_new_files(files, overwrite)
        check_index_replaceable(index_path, features_path)
    embedder = open_runner(model, device, threads)
    source = data if isinstance(data, ImageSource) else ImageSource(
        data, seed, workers=workers, skip_corrupt=skip_corrupt, image_column=image_column, label_column=label_column)
    batch_size = batch_size or embedder.static_batch or 32
    requested = source.positions(n)  # opens the source: a bad spec is refused here
    stream = source.stream(embedder.config, n, batch_size, rank=rank, world=world)
    model_name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    head = {"format": "mimc-embeddings", "version": 1, "model": model_name, "runtime": embedder.runtime,
            "source": source.spec, "seed": source.seed, "n": n if n is None else int(n), "tokens": tokens,
            "shard": {"rank": rank, "world": world} if world > 1 and not gathered else None,
            "features": features_path.name, "dtype": "float32", "class_names": stream.class_names}
    capacity = len(requested) if gathered else len(stream.positions)
    return _Job(embedder, source, stream, files, fmt, head, capacity, batch_size, model_name)


# torchrun: every rank embeds its shard, rank 0 writes them all -----------------------------------------
def _receive(group: Ranks, job: _Job, writer, shard: ShardResult) -> list[ShardResult]:
    """Rank 0: the other ranks' counts, then their rows in rank order (sent in chunks of ``batch_size``
    rows, sizes known to both sides from the agreed counts), written behind its own."""
    others = group.agree(None, shard)[1:]
    reader = job.source.reader
    for r, other in enumerate(others, start=1):
        for k in range(0, other.rows, job.batch_size):
            count = min(job.batch_size, other.rows - k)
            pos = group.wire(torch.empty(count, dtype=torch.int64))
            feats = group.wire(torch.empty((count, *other.row_shape), dtype=torch.float32))
            group.tdist.recv(pos, src=r)
            group.tdist.recv(feats, src=r)
            pos_np = pos.cpu().numpy()
            labels = reader.labels[pos_np] if reader.labels is not None else None
            writer.write(feats.cpu().numpy(), pos_np, [reader.name(int(p)) for p in pos_np], labels)
    return others


def _send_shard(group: Ranks, job: _Job, shard: ShardResult, spool, positions: list[np.ndarray]) -> dict[str, Any]:
    """A rank other than 0: agree on the counts, send the spooled rows to rank 0, return its report."""
    group.agree(None, shard)
    spool.seek(0)
    pos_all = np.concatenate(positions) if positions else np.empty(0, np.int64)
    width = int(np.prod(shard.row_shape)) if shard.row_shape else 0
    for k in range(0, shard.rows, job.batch_size):
        pos = pos_all[k:k + job.batch_size]
        feats = np.fromfile(spool, dtype=np.float32, count=len(pos) * width).reshape(len(pos), *shard.row_shape)
        group.tdist.send(group.wire(torch.from_numpy(pos)), dst=0)
        group.tdist.send(group.wire(torch.from_numpy(feats)), dst=0)
    body = group.outcome(None, None)
    return {**body, "written": False, "rank": group.rank}


__all__ = ["embed", "embed_rows"]
