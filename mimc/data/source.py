"""What the pipeline hands every stage: an image source read in batches, with bounded memory.

:class:`ImageSource` is a data spec plus a seed and how to read it (worker processes, whether to
skip unreadable images, which columns). A stage asks it for

- :meth:`~ImageSource.stream` — batches of a seeded subset (or all) preprocessed for its encoder,
  decoded in DataLoader worker processes ahead of use, in a fixed order; under torchrun each rank
  reads its own contiguous shard. Memory holds a few batches, never the set;
- :meth:`~ImageSource.batches` — the same batches for calibration-sized requests (held in memory
  once when they fit :data:`CACHE_BYTES`, streamed again on every pass otherwise);
- :meth:`~ImageSource.draw` — a small set as one :class:`ImageSet` (its sha256 names a calibration
  set in manifests);
- :meth:`~ImageSource.indexed` — random access by position (learning: each step loads its batch).

A seeded subset (``n``) is ``sorted(default_rng(seed).choice(count, n))``: the images it leaves
out are never read. Every image is prepared on its own (:mod:`mimc.data.preprocess`), so the bytes
do not depend on the batch size, the number of workers or the number of ranks.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mimc.data.preprocess import ArrayLayout, prepare_image
from mimc.data.readers import Reader
from mimc.data.spec import open_reader
from mimc.errors import DataError, whole

CACHE_BYTES = 1 << 30  # ImageSource.batches keeps a request in memory up to this size
AUTO_WORKER_MIN_IMAGES = 256  # fewer images than this decode in the calling process (workers cost a fork each)


@dataclass
class ImageSet:
    """Preprocessed inputs for one encoder, with labels when the source has them."""

    pixels: torch.Tensor  # (N, C, H, W) or (N, T, C, H, W), float32, normalised
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str
    sha256: str  # hash of the preprocessed pixels: identifies the calibration set in manifests
    names: list[str] | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def batches(self, batch_size: int = 16) -> Iterator[torch.Tensor]:
        yield from self.pixels.split(batch_size)

    def subset(self, index: np.ndarray | list[int]) -> "ImageSet":
        index = np.asarray(index)
        labels = self.labels[index] if self.labels is not None else None
        pixels = self.pixels[torch.as_tensor(index, dtype=torch.long)]
        names = [self.names[i] for i in index] if self.names is not None else None
        return ImageSet(pixels, labels, self.class_names, self.source, hash_tensor(pixels), names)


def hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy()).hexdigest()


def input_spec(cfg) -> tuple:
    """What an encoder's inputs are prepared for: images prepared for one config serve any config with the same spec."""
    return (tuple(cfg.input_shape), tuple(cfg.image_mean), tuple(cfg.image_std))


@dataclass
class Batch:
    """One streamed batch: the model inputs and where they came from."""

    pixels: torch.Tensor
    positions: np.ndarray  # positions in the source
    labels: np.ndarray | None
    names: list[str]


@dataclass
class StreamStats:
    skipped: list[str] = field(default_factory=list)  # names of unreadable images skipped (skip_corrupt)


class _Items(torch.utils.data.Dataset):
    """Position k of a request -> (model input or None, k, error or None); runs in workers. An error
    is (message, options, unreadable): raised here it would reach the caller wrapped in a worker
    traceback. Only an image that cannot be read is ``unreadable`` (skipped with skip_corrupt); one
    read but unfit for the model (its channels, its shape) is the whole source's problem, never skipped."""

    def __init__(self, source: "ImageSource", cfg, positions: np.ndarray):
        self.reader, self.cfg, self.positions = source.reader, cfg, positions
        self.layout = source.layout(cfg, positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        try:
            raw = self.reader.read(int(self.positions[k]))
        except DataError as exc:
            return None, k, (str(exc), exc.options, True)
        try:
            x = self.layout.prepare(raw) if self.layout is not None else prepare_image(raw, self.cfg)
        except DataError as exc:
            return None, k, (str(exc), exc.options, False)
        return x, k, None


def _collate(items):
    """A batch stacked where it was decoded (in the worker: one shared-memory tensor crosses to the
    caller instead of one per image, and the copy runs beside the computation) plus the errors."""
    good = [(x, k) for x, k, err in items if err is None]
    pixels = torch.stack([x for x, _ in good]) if good else None
    return pixels, [k for _, k in good], [(k, err) for _, k, err in items if err is not None]


class ImageStream:
    """A re-iterable stream of :class:`Batch` over fixed positions (each pass reads them again)."""

    def __init__(self, source: "ImageSource", cfg, positions: np.ndarray, batch_size: int, workers: int):
        self.source, self.cfg, self.positions = source, cfg, positions
        self.batch_size, self.workers = batch_size, workers
        reader = source.reader
        self.labels = reader.labels[positions] if reader.labels is not None else None
        self.class_names = reader.class_names
        self.stats = StreamStats()

    def __len__(self) -> int:
        """Batches per pass."""
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        limit_heap_growth()
        reader = self.source.reader
        items = _Items(self.source, self.cfg, self.positions)
        chunks = [list(range(i, min(i + self.batch_size, len(items)))) for i in range(0, len(items), self.batch_size)]
        loader = torch.utils.data.DataLoader(items, batch_sampler=chunks, num_workers=self.workers, collate_fn=_collate,
                                             prefetch_factor=2 if self.workers else None, persistent_workers=False,
                                             generator=torch.Generator())  # else its base seed is drawn from the caller's RNG
        self.stats = StreamStats()
        for pixels, good, errors in loader:
            for k, (message, options, unreadable) in errors:
                if not (unreadable and self.source.skip_corrupt):
                    raise DataError(message, option=options or "data")
                name = reader.name(int(self.positions[k]))
                self.stats.skipped.append(name)
                if name not in self.source.skipped:
                    self.source.skipped.append(name)
            if not good:
                continue
            pos = self.positions[np.asarray(good)]
            yield Batch(pixels, pos, reader.labels[pos] if reader.labels is not None else None, [reader.name(int(p)) for p in pos])


class _PixelBatches:
    """``ImageSource.batches`` past the cache size: re-iterable pixel batches, streamed each pass."""

    def __init__(self, stream: ImageStream):
        self.stream = stream

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (batch.pixels for batch in self.stream)

    def __len__(self) -> int:
        return len(self.stream)


class IndexedImages:
    """Random access to a request's images: ``load(indices)`` -> their model inputs, in that order.

    Index ``k`` is the k-th image of the request (of its seeded subset). An unreadable image raises
    its DataError even with skip_corrupt: a learning run's batches are fixed by its seed.
    """

    def __init__(self, source: "ImageSource", cfg, positions: np.ndarray):
        self.source = source
        self.items = _Items(source, cfg, positions)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        out = []
        for k in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
            x, _, err = self.items[int(k)]
            if err is not None:
                message, options, _ = err
                raise DataError(message.replace(", or skip unreadable images with skip_corrupt", ""),
                                option=tuple(o for o in options if o != "skip_corrupt") or "data")
            out.append(x)
        return torch.stack(out)


@functools.cache
def limit_heap_growth() -> None:
    """Keep a long stream's memory flat: glibc raises its mmap threshold each time a large block is
    freed, after which every batch-sized buffer (decoded pixels, a runtime's token outputs) comes from
    the heap, which fragments and grows with the number of batches (measured: README.md, "Memory does
    not grow with the data set"). Pinning it (128 KiB, glibc's default) keeps such buffers in their own
    mappings, returned on free. Once per process; a no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding processes beside the one that computes: most cores, at least one, at most 8."""
    return max(1, min(8, _cores() - 1))


def check_workers(workers: int | None) -> None:
    """At most 4 worker processes per core (at least 8): each is a forked process, and 100000 exhaust the machine."""
    most = max(8, 4 * _cores())
    if workers is not None and workers > most:
        raise DataError(f"workers {workers} is more than {most} (4 per core here): choose fewer", option="workers")


class ImageSource:
    """A data spec plus a seed and how to read it: what the pipeline hands every stage instead of a path.

    ``workers``: DataLoader worker processes that decode and preprocess (None: :func:`default_workers`
    for requests of :data:`AUTO_WORKER_MIN_IMAGES` images or more, none below; 0: in this process).
    ``skip_corrupt``: skip unreadable images (counted in the stream's ``stats``) instead of stopping.
    ``image_column`` / ``label_column``: the columns of a saved ``datasets`` folder (default: its
    ``Image`` and ``ClassLabel`` columns).
    """

    def __init__(self, spec: str | Path, seed: int = 0, *, workers: int | None = None, skip_corrupt: bool = False,
                 image_column: str | None = None, label_column: str | None = None):
        if seed is not None and (not whole(seed) or seed < 0):
            raise DataError(f"seed must be a non-negative whole number, got {seed!r}", option="seed")
        if workers is not None and (not whole(workers) or workers < 0):
            raise DataError(f"workers must be 0 (decode in this process) or more, got {workers!r}", option="workers")
        check_workers(workers)
        self.spec = str(spec)
        self.seed = seed if seed is None else int(seed)  # a numpy integer is recorded as a number
        self.workers = workers
        self.skip_corrupt = skip_corrupt
        self.image_column, self.label_column = image_column, label_column
        self.skipped: list[str] = []  # every unreadable image skipped so far (skip_corrupt), by name
        self._drawn: dict[tuple, ImageSet] = {}
        self._layouts: dict[tuple, ArrayLayout] = {}
        self.fixed: ImageSet | None = None  # set by :meth:`of`

    def __repr__(self) -> str:
        return f"ImageSource({self.spec!r}, seed={self.seed})"

    def __str__(self) -> str:
        return self.spec  # what reports and messages name

    @classmethod
    def of(cls, images: ImageSet) -> "ImageSource":
        """A source over images already in memory (a search's calibration split): every draw returns them."""
        source = cls(images.source)
        source.fixed = images
        return source

    # What the source holds ----------------------------------------------------------------------
    @functools.cached_property
    def reader(self) -> Reader:
        return open_reader(self.spec, self.image_column, self.label_column)

    def __len__(self) -> int:
        return len(self.fixed) if self.fixed is not None else len(self.reader)

    def positions(self, n: int | None = None) -> np.ndarray:
        """The seeded subset of ``n`` positions (all when None or more than the source holds), sorted."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise DataError(f"n must be a positive number of images (or none for all), got {n!r}", option="n")
        count = len(self)
        if n is not None and n < count:
            return np.sort(np.random.default_rng(self.seed).choice(count, size=n, replace=False))
        return np.arange(count)

    def layout(self, cfg, positions: np.ndarray) -> ArrayLayout | None:
        """How an array source's rows become model inputs (decided once, from the first rows asked for)."""
        reader = self.reader
        if reader.kind != "array":
            return None
        key = (*input_spec(cfg), cfg.num_frames)
        if key not in self._layouts:
            self._layouts[key] = ArrayLayout(reader.rows(np.sort(positions[:64])), cfg, reader.spec)
        return self._layouts[key]

    # Reading -------------------------------------------------------------------------------------
    def _workers(self, count: int) -> int:
        if self.workers is not None:
            return self.workers
        return default_workers() if count >= AUTO_WORKER_MIN_IMAGES else 0

    def stream(self, cfg, n: int | None = None, batch_size: int = 64, *, rank: int = 0, world: int = 1) -> ImageStream:
        """Batches of the seeded subset of ``n`` images (all when None); with ``world`` > 1, this
        rank's contiguous share of it."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}", option="batch_size")
        positions = self.positions(n)
        if world > 1:
            positions = np.array_split(positions, world)[rank]
        return ImageStream(self, cfg, positions, batch_size, self._workers(len(positions)))

    def draw(self, cfg, n: int | None = None) -> ImageSet:
        """A seeded subset of ``n`` images (all when None) preprocessed for ``cfg``, in memory."""
        if self.fixed is not None:
            return self.fixed
        key = (*input_spec(cfg), cfg.num_frames, n)
        if key not in self._drawn:
            stream = self.stream(cfg, n, batch_size=64)
            batches = list(stream)
            if not batches:
                raise DataError(f"{self.spec}: every image was unreadable and skipped: pass readable images", option="data")
            pixels = torch.cat([b.pixels for b in batches])
            labels = np.concatenate([b.labels for b in batches]) if batches[0].labels is not None else None
            names = [name for b in batches for name in b.names]
            self._drawn[key] = ImageSet(pixels, labels, stream.class_names, self.spec, hash_tensor(pixels), names)
        return self._drawn[key]

    def batches(self, cfg, n: int | None = None, batch_size: int = 64):
        """Pixel batches of the seeded subset: a list when it fits :data:`CACHE_BYTES`, else a
        re-iterable stream that reads the images again on each pass."""
        if self.fixed is not None:
            return list(self.fixed.batches(batch_size))
        count = len(self.positions(n))
        if count * 4 * int(np.prod(cfg.input_shape)) <= CACHE_BYTES:
            return list(self.draw(cfg, n).batches(batch_size))
        return _PixelBatches(self.stream(cfg, n, batch_size))

    def indexed(self, cfg, n: int | None = None) -> IndexedImages:
        """Random access to the seeded subset (what a learning run loads step by step)."""
        if self.fixed is not None:
            raise DataError("an in-memory image set has no positions to load: pass the set's tensor instead", option="data")
        return IndexedImages(self, cfg, self.positions(n))


def as_source(data, seed: int = 0) -> ImageSource | None:
    """The source a ``data`` argument names: a spec (folder, file, shard pattern, 'builtin') read with
    default options, or an :class:`ImageSource` (its own seed and reading options), kept as given."""
    if data is None or isinstance(data, ImageSource):
        return data
    return ImageSource(data, seed)


def spec_of(data) -> str | None:
    """The spec string of a ``data`` argument (what reports and output checks name)."""
    return data.spec if isinstance(data, ImageSource) else (None if data is None else str(data))


def load_images(spec: str | Path, cfg, n: int | None = None, seed: int = 0, **options) -> ImageSet:
    """Read and preprocess images for the encoder described by ``cfg`` (a seeded subset of ``n``)."""
    return ImageSource(spec, seed, **options).draw(cfg, n)


def deterministic_inputs(cfg, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal inputs of the encoder's shape (for validation and export)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *cfg.input_shape), generator=g)


__all__ = ["as_source", "spec_of", "ImageSet", "ImageSource", "ImageStream", "IndexedImages", "Batch", "load_images", "deterministic_inputs",
           "hash_tensor", "default_workers", "CACHE_BYTES"]
