"""The deploy-time verb: embed (a model's features on a data source, streamed to .npy + index or .parquet)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass
class EmbedReport:
    """What ``mimc embed`` wrote: the file, its index, how many images, how fast."""

    model: str
    runtime: str  # torch, onnxruntime-cpu, onnxruntime-cuda, openvino-cpu, tensorrt
    device: str
    output: str
    index: str | None  # the .json beside an .npy; None for Parquet
    format: str  # npy or parquet
    source: str
    tokens: bool
    n: int | None  # the seeded subset asked for (None: all); images + skipped below it: the source holds fewer
    images: int  # rows written
    skipped: int  # unreadable images skipped (skip_corrupt)
    skipped_names: list[str]  # the first 20 of them (all are in the index)
    seconds: float  # the whole run: loading the model and the source, embedding, writing
    images_per_second: float | None  # rows / seconds of the embedding loop (decoding, inference, writing)
    feature_shape: list[int]  # one row: [D] pooled, [T, D] with tokens
    shape: list[int]
    batch_size: int
    threads: int | None
    workers: int  # decoding processes (0: in this process)
    rank: int = 0
    world: int = 1
    written: bool = True  # False on torchrun ranks other than 0: rank 0 writes every rank's rows

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed(model, data, output, *, tokens: bool = False, n: int | None = None, seed: int = 0, batch_size: int | None = None,
          workers: int | None = None, skip_corrupt: bool = False, image_column: str | None = None,
          label_column: str | None = None, device: str | None = None, threads: int | None = None, overwrite: bool = False,
          on_progress: Callable[[int, int], None] | None = None) -> EmbedReport:
    """Features of MODEL (any MODEL argument, an Encoder, a mimc ``.onnx``, an OpenVINO ``.xml``, a TensorRT
    ``.engine`` / ``.plan``) on every image of ``data`` (or a seeded subset of ``n``), written to ``output``.

    ``output``: ``feats.npy`` (or no suffix) with a ``feats.json`` index beside it, or ``feats.parquet``.
    Pooled features ``(N, D)``, or every token ``(N, T, D)`` with ``tokens``. Under torchrun every rank
    embeds its contiguous shard and rank 0 writes one output (see :mod:`mimc.embedding`)."""
    from mimc.embedding import embed as _embed
    from mimc.train.dist import context, shutdown

    ctx = context()  # WORLD_SIZE > 1 (torchrun): joins the process group
    body = _embed(model, data, output, tokens=tokens, n=n, seed=seed, batch_size=batch_size, workers=workers,
                  skip_corrupt=skip_corrupt, image_column=image_column, label_column=label_column, device=device,
                  threads=threads, overwrite=overwrite, on_progress=on_progress if ctx.is_main else None,
                  rank=ctx.rank, world=ctx.world_size, gather=ctx.distributed)
    shutdown()  # under torchrun every rank leaves the process group (a no-op otherwise)
    return EmbedReport(**body)


__all__ = ["embed", "EmbedReport"]
