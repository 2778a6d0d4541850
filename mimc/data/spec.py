"""Which reader a data spec names: ``builtin``, WebDataset shards (a ``.tar`` or a brace pattern), a
saved ``datasets`` folder, an image folder or a ``.npy``/``.npz`` array; one-line errors for the rest."""
from __future__ import annotations

from pathlib import Path

from mimc.data.datasets_dir import HFDatasetReader, is_saved_dataset
from mimc.data.readers import BUILTIN, BUILTIN_PATH, ArrayReader, FolderReader, Reader
from mimc.data.shards import TarReader, is_shard_spec
from mimc.errors import DataError

SPEC_HELP = "pass an image folder, .npy/.npz, WebDataset shards (a .tar or a {000..009} pattern), a saved datasets folder or 'builtin'"


def open_reader(spec: str | Path, image_column: str | None = None, label_column: str | None = None) -> Reader:
    """The reader for a data spec; a one-line DataError when it names nothing readable, or when a
    column is named for a source that has none (only a saved datasets folder has columns)."""
    reader = _reader(str(spec), image_column, label_column)
    column = "image_column" if image_column is not None else "label_column" if label_column is not None else None
    if column is not None and not isinstance(reader, HFDatasetReader):
        raise DataError(f"{column} names a column of a saved datasets folder, which {spec} is not: drop {column}", option=column)
    return reader


def _reader(spec: str, image_column: str | None, label_column: str | None) -> Reader:
    if spec == BUILTIN:
        if not BUILTIN_PATH.is_file():
            raise DataError(f"built-in images missing at {BUILTIN_PATH}: reinstall mimc")
        return ArrayReader(BUILTIN_PATH, BUILTIN)
    if is_shard_spec(spec):
        return TarReader(spec)
    if not spec.strip():  # else Path("") is the current folder, read in silence
        raise DataError(f"data is empty: {SPEC_HELP} (. for the current folder)", option="data")
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: {SPEC_HELP}", option="data")
    if is_saved_dataset(path):
        return HFDatasetReader(path, image_column, label_column)
    if path.is_dir():
        return FolderReader(path)
    if path.suffix.lower() in (".npz", ".npy"):
        return ArrayReader(path)
    raise DataError(f"{path} is neither a folder nor a .npy/.npz file: {SPEC_HELP}", option="data")


__all__ = ["open_reader", "SPEC_HELP"]
