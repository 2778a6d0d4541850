"""The images a learning run reads: any indexed collection, loaded one step's shard at a time.

A run never holds its whole data set. It is given an :class:`IndexedImages` (``len()`` and
``load(indices)`` returning the preprocessed pixels of those positions, in that order); each step
the sampler draws the global batch's positions and each torchrun rank loads only its own shard of
them. A tensor already in memory is wrapped in :class:`TensorImages`. :class:`StepBatches` is the
map-style dataset over step numbers a ``DataLoader`` prefetches from (see :func:`step_loader`),
starting at the resumed step so nothing before it is read.
"""
from __future__ import annotations

import functools
import hashlib
import os
from fractions import Fraction
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from mimc.data.source import IndexedImages as SourceImages, default_workers as per_node, hash_tensor


@runtime_checkable
class IndexedImages(Protocol):
    """Preprocessed images by position. ``sha256`` (optional attribute): an identity of the whole
    set that a resumed run compares; without it a sample of the images is hashed (:func:`fingerprint`)."""

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> torch.Tensor: ...


class TensorImages:
    """Images already in memory (one tensor, first dimension the image)."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return self.pixels[torch.as_tensor(indices, dtype=torch.long)]

    @functools.cached_property
    def sha256(self) -> str:
        """The hash of every pixel (what runs recorded before images were indexed: checkpoints stay resumable)."""
        return hash_tensor(self.pixels)


def as_indexed(images) -> IndexedImages:
    """A stage's data input as :class:`IndexedImages`: indexed images as they are, a tensor wrapped, and
    a list of batches (what one-shot stages are handed) concatenated."""
    if isinstance(images, torch.Tensor):
        return TensorImages(images)
    if isinstance(images, IndexedImages):
        return images
    batches = list(images or [])
    return TensorImages(torch.cat(batches) if batches else torch.empty(0))


def first_batches(images: IndexedImages, limit: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``limit`` images (calibration, held-in fidelity) in batches of ``batch_size``."""
    count = min(limit, len(images))
    return [images.load(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


FULL_HASH_BYTES = 256 << 20  # sets up to this size are hashed whole (a few hundred 224-px images)


def fingerprint(images: IndexedImages, sample: int = 16, full_bytes: int = FULL_HASH_BYTES) -> str:
    """What a resumed run checks it reads the same images: the set's ``sha256`` when it has one; the hash
    of every pixel when they total at most ``full_bytes`` (read in batches; the same hash as the
    tensor's, so runs recorded when every set was a tensor stay resumable); else a hash of the count
    and of ``sample`` evenly spread images."""
    known = getattr(images, "sha256", None)
    if isinstance(known, str):
        return known
    count = len(images)
    first = images.load([0])
    if count * first.numel() * first.element_size() <= full_bytes:
        digest = hashlib.sha256()
        for batch in first_batches(images, count, 64):
            digest.update(batch.contiguous().numpy())
        return digest.hexdigest()
    picks = sorted({round(i * (count - 1) / max(1, sample - 1)) for i in range(min(sample, count))})
    digest = hashlib.sha256(f"{count}:{picks}".encode())
    digest.update(images.load(picks).contiguous().numpy())
    return "sample:" + digest.hexdigest()


def steps_for_epochs(epochs: float, count: int, batch_size: int) -> int:
    """ceil(epochs × count / batch_size), in exact arithmetic (0.1 × 30 / 3 is 1 step, not 2)."""
    return max(1, -(-Fraction(str(epochs)) * count // batch_size))


class Sampler:
    """The global batch of each step: a fresh seeded permutation of the images every epoch."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self._perms = count, seed, {}

    def indices(self, step: int, batch: int) -> torch.Tensor:
        out = []
        for k in range(step * batch, (step + 1) * batch):
            epoch, pos = divmod(k, self.count)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch + 1))}
            out.append(self._perms[epoch][pos])
        return torch.stack(out)


class StepBatches(Dataset):
    """Item ``i``: this rank's shard of the images of step ``start + i`` (positions from :class:`Sampler`)."""

    def __init__(self, images: IndexedImages, seed: int, batch_size: int, shard: slice, start: int, stop: int):
        self.images, self.batch_size, self.shard, self.start, self.stop = images, batch_size, shard, start, stop
        self.sampler = Sampler(len(images), seed)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        idx = self.sampler.indices(self.start + i, self.batch_size)[self.shard]
        return self.images.load(idx.tolist())


def default_workers(images: IndexedImages) -> int:
    """Loading processes when a run names none: none for images in memory (nothing to overlap); a data
    source's own ``workers`` when it has them; else :func:`mimc.data.default_workers` shared among this
    node's torchrun ranks (at least one each)."""
    if isinstance(images, TensorImages):
        return 0
    if isinstance(images, SourceImages) and images.source.workers is not None:
        return images.source.workers
    return max(1, per_node() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def step_loader(batches: StepBatches, workers: int, pin_memory: bool = False) -> Iterable[torch.Tensor]:
    """The batches of every step in order; ``workers`` > 0 loads the next steps in background processes
    (two steps ahead per worker) while this one computes, 0 loads each in the main process."""
    # Its own generator: a DataLoader draws a base seed from the global RNG otherwise, which a
    # checkpoint saves (the run's results do not depend on it, but its checkpoints would).
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers > 0 else None, generator=torch.Generator())


__all__ = ["IndexedImages", "TensorImages", "Sampler", "StepBatches", "as_indexed", "default_workers", "first_batches",
           "fingerprint", "step_loader", "steps_for_epochs"]
