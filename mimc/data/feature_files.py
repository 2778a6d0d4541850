"""The feature files ``mimc embed`` writes, row batch by row batch, never holding the set.

- ``feats.npy`` (no suffix: ``.npy`` is added): float32 rows ``(N, D)`` pooled, or ``(N, T, D)`` with
  tokens, written behind a header reserved for every requested image and rewritten to the rows
  written at the end; beside it ``feats.json``, the index (head, one row per feature row, counts),
  itself written row by row;
- ``feats.parquet`` (pyarrow): columns ``name``, ``position``, ``label``, ``feature``, one row group
  per :data:`ROW_GROUP_BYTES`; the index's head in the schema metadata, the counts in the footer.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mimc.errors import BadInputError, MimcError, MissingExtraError

FORMATS = {".npy": "npy", ".parquet": "parquet"}
ROW_GROUP_BYTES = 16 << 20  # Parquet: rows buffered up to this size per row group
INDEX_START = b'{\n  "format": "mimc-embeddings"'  # how every index _IndexWriter writes begins


# Outputs ------------------------------------------------------------------------------------------
def output_paths(output: str | os.PathLike) -> tuple[Path, Path | None, str]:
    """``(features file, index file or None, format)`` for an ``-o`` value; its suffix in any case (``x.NPY``:
    x.NPY and the index x.json)."""
    path = Path(output)  # (a trailing / names a folder, made or not: Path drops it)
    if str(output).endswith(("/", os.sep)) or path.suffix == "" and os.path.isdir(path):  # isdir: False for a name too long
        raise BadInputError(f"output {path} is a folder: name the features file in it, like {path / 'feats'}", option="output")
    if path.suffix == "":
        path = path.with_name(path.name + ".npy")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(f"output {path.name} must end in .npy (with a .json index beside it) or .parquet", option="output")
    return path, (path.with_suffix(".json") if fmt == "npy" else None), fmt


def check_index_replaceable(index: Path | None, features: Path) -> None:
    """Overwriting replaces an index mimc wrote, never another JSON file beside the features (an
    artifact's mimc.json, a model's config.json, a graph's sidecar: ``-o ART/mimc``)."""
    if index is not None and index.is_file():
        with open(index, "rb") as f:
            if f.read(len(INDEX_START)) != INDEX_START:
                raise BadInputError(f"{index} is not an embeddings index (the index of {features.name} "
                                    "would replace it): choose another output", option="output")


def _npy_header(shape: tuple[int, ...], size: int | None = None) -> bytes:
    """A version 1.0 .npy header for float32 C-order ``shape``, padded to ``size`` bytes (default:
    64-byte aligned with room to spare, so a header with fewer rows fits the same bytes)."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (tuple(int(d) for d in shape),)
    if size is None:
        size = -(-(10 + len(text) + 1 + 16) // 64) * 64
    pad = size - 10 - len(text) - 1
    if pad < 0:
        raise MimcError(f"internal: .npy header for shape {shape} does not fit {size} bytes")
    body = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


@contextlib.contextmanager
def writing(path: Path):
    """A failed write (disk full, quota, a vanished folder) as one line naming the output."""
    try:
        yield
    except OSError as exc:
        raise MimcError(f"cannot write {path.name} ({exc.strerror or exc}): free space or choose another output",
                        option="output") from None


class _IndexWriter:
    """The JSON index, written as it grows: the head, one line per row, the counts at the end."""

    def __init__(self, path: Path, head: dict[str, Any]):
        self.file = open(path, "w", encoding="utf-8")
        self.file.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items()) + '  "rows": [')
        self.first = True

    def rows(self, names: list[str], positions: np.ndarray, labels: np.ndarray | None) -> None:
        lines = []
        for i, (name, pos) in enumerate(zip(names, positions)):
            label = int(labels[i]) if labels is not None else None
            lines.append(json.dumps({"name": name, "position": int(pos), "label": label}))
        if lines:
            self.file.write(("\n    " if self.first else ",\n    ") + ",\n    ".join(lines))
            self.first = False

    def close(self, tail: dict[str, Any]) -> None:
        self.file.write("\n  ],\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in tail.items()) + "\n}\n")
        self.file.close()


class NpyWriter:
    """Float32 rows appended to an .npy (header reserved for ``capacity`` rows) plus the JSON index."""

    def __init__(self, features: Path, index: Path, capacity: int, head: dict[str, Any]):
        self.file = open(features, "r+b")
        self.index = _IndexWriter(index, head)
        self.capacity, self.rows, self.row_shape, self.header_size = capacity, 0, None, 0

    def write(self, feats: np.ndarray, positions: np.ndarray, names: list[str], labels: np.ndarray | None) -> None:
        if self.row_shape is None:
            self.row_shape = tuple(feats.shape[1:])
            header = _npy_header((self.capacity, *self.row_shape))
            self.header_size = len(header)
            self.file.write(header)
        if self.rows + len(feats) > self.capacity:
            raise MimcError(f"internal: more rows ({self.rows + len(feats)}) than requested ({self.capacity})")
        np.ascontiguousarray(feats, dtype=np.float32).tofile(self.file)
        self.rows += len(feats)
        self.index.rows(names, positions, labels)

    def close(self, tail: dict[str, Any]) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), self.header_size))
        self.file.truncate(self.header_size + self.rows * 4 * int(np.prod(self.row_shape)))
        self.file.close()
        self.index.close(tail)

    def abort(self) -> None:
        for file in (self.file, self.index.file):  # bytes still buffered for a full disk fail again: the temporaries go anyway
            with contextlib.suppress(OSError):
                file.close()


def pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingExtraError("writing Parquet needs pyarrow, which is not installed: pip install 'mimc[datasets]', "
                                "or write .npy") from None
    return pa


class ParquetWriter:
    """Rows as Parquet (name, position, label, feature), one row group per :data:`ROW_GROUP_BYTES`."""

    def __init__(self, path: Path, head: dict[str, Any]):
        self.pa = pyarrow()
        self.path, self.head, self.writer = path, head, None
        self.buffer: list[Any] = []
        self.buffered = 0

    def write(self, feats: np.ndarray, positions: np.ndarray, names: list[str], labels: np.ndarray | None) -> None:
        pa = self.pa
        values = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
        for size in reversed(feats.shape[1:]):  # tokens: a fixed-size list of per-token lists
            values = pa.FixedSizeListArray.from_arrays(values, size)
        if self.writer is None:
            import pyarrow.parquet as pq

            self.schema = pa.schema([("name", pa.string()), ("position", pa.int64()), ("label", pa.int64()),
                                     ("feature", values.type)], metadata={"mimc": json.dumps(self.head)})
            self.writer = pq.ParquetWriter(str(self.path), self.schema)
        label = pa.array(labels.astype(np.int64) if labels is not None else [None] * len(names), pa.int64())
        self.buffer.append(pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(positions.astype(np.int64)), label, values],
                                                schema=self.schema))
        self.buffered += feats.nbytes
        if self.buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(self.pa.concat_tables(self.buffer), row_group_size=1 << 30)
        self.buffer, self.buffered = [], 0

    def close(self, tail: dict[str, Any]) -> None:
        self._flush()
        self.writer.add_key_value_metadata({"mimc_counts": json.dumps(tail)})
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


__all__ = ["FORMATS", "ROW_GROUP_BYTES", "output_paths", "check_index_replaceable", "writing", "NpyWriter", "ParquetWriter", "pyarrow"]
