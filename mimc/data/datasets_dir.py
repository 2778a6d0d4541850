"""A Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``mimc[datasets]``): the image
column (an ``Image`` feature, or named) and the label column (a ``ClassLabel``, or named)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimc.data.readers import Reader, decode, first_line, pil_rgb, unreadable
from mimc.errors import DataError, require


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


class HFDatasetReader(Reader):
    """A ``datasets`` directory from ``save_to_disk`` (Arrow, memory-mapped: rows are read on demand)."""

    def __init__(self, path: Path, image_column: str | None = None, label_column: str | None = None):
        super().__init__(str(path))
        datasets = require("datasets", "datasets", "reading a saved datasets folder")
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path} holds the splits {', '.join(splits)}: point data at one of them ({path / (splits[0] if splits else 'train')})",
                            option="data")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid... on a bad folder
            raise DataError(f"cannot read {path} as a saved datasets folder ({first_line(exc)}): "
                            "write it with Dataset.save_to_disk", option="data") from None
        features = ds.features
        columns = list(ds.column_names)
        if image_column is None:
            found = [c for c, f in features.items() if type(f).__name__ == "Image"]
            if len(found) != 1:
                raise DataError(f"{path} has {'no' if not found else len(found)} image columns (columns: {', '.join(columns)}): "
                                "name the one to use with image_column", option="image_column")
            image_column = found[0]
        elif image_column not in columns:
            raise DataError(f"{path} has no column '{image_column}' (columns: {', '.join(columns)}): name the image column with image_column",
                            option="image_column")
        if label_column is None:
            found = [c for c, f in features.items() if type(f).__name__ == "ClassLabel"]
            label_column = found[0] if len(found) == 1 else ("label" if "label" in columns else None)
        elif label_column not in columns:
            raise DataError(f"{path} has no column '{label_column}' (columns: {', '.join(columns)}): name the label column with label_column",
                            option="label_column")
        if len(ds) == 0:
            raise DataError(f"{path} holds no rows: pass a non-empty data set", option="data")
        self.image_column, self.label_column = image_column, label_column
        if label_column is not None:
            self.labels = np.asarray(ds.data.column(label_column).to_numpy(zero_copy_only=False))
            if self.labels.dtype.kind not in "iu":
                raise DataError(f"{path} column '{label_column}' holds {self.labels.dtype} values, not class indices: "
                                "cast it to a ClassLabel or name another label_column", option="label_column")
            names = getattr(features[label_column], "names", None)
            self.class_names = list(names) if names else None
            missing = int(np.count_nonzero(self.labels == -1)) if names else 0  # a ClassLabel's "no label"
            if missing == len(self.labels):  # an unlabelled split (a test split)
                self.labels, self.class_names = None, None
            elif missing:
                raise DataError(f"{path}: {missing} of {len(self.labels)} rows have no label (-1 in column '{label_column}'): "
                                "label every row or none", option="data")
        self.dataset = ds.select_columns([image_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> np.ndarray:
        what = self.name(i)
        try:
            value = self.dataset[int(i)][self.image_column]
            if hasattr(value, "convert"):  # a decoded PIL image
                return pil_rgb(value)
        except Exception as exc:  # PIL errors raised while datasets decodes the cell; pil_rgb's refusals
            raise unreadable(what, exc) from None
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return decode(value.get("bytes") or value["path"], what)
        if isinstance(value, (list, np.ndarray)):
            return np.asarray(value)
        if value is None:  # an empty cell of the image column
            raise unreadable(what, ValueError("the row has no image"))
        raise DataError(f"{self.spec} column '{self.image_column}' holds {type(value).__name__}, not images: name the image column with image_column",
                        option="image_column")


__all__ = ["HFDatasetReader", "is_saved_dataset"]
