"""WebDataset tar shards (``train-{000..099}.tar``) read through an index of member offsets.

Samples are grouped by key (the member path up to the first dot of its base name); the image is the
first image member (``jpg``, ``png``, ``webp``, ...), the label the ``cls`` / ``label`` text. Read with
the standard library's ``tarfile``: the ``webdataset`` package only iterates shards in order, which
cannot give a seeded subset, a per-rank split of a global batch or an exact resume.
"""
from __future__ import annotations

import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from mimc.data.readers import Reader, class_indices, decode, first_line, text_name, unreadable
from mimc.errors import DataError

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
TAR_LABEL_EXTS = ("cls", "cls.txt", "cls2", "label", "label.txt", "class", "target", "target.txt")
MAX_OPEN_SHARDS = 64  # file handles a reader keeps open per process (a thousand shards would pass `ulimit -n`)
MAX_LABEL_BYTES = 4096  # a label member past this is not a class name
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` lists; nested left to right.

    The brace forms WebDataset documents (a leading zero in either bound pads to the longer one); written here
    because the ``braceexpand`` package would be a core dependency for these twenty lines.
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise DataError(f"shard pattern {pattern} counts down ({lo}..{hi}): write the range low..high", option="data")
        if int(hi) - int(lo) > 1_000_000:
            raise DataError(f"shard pattern {pattern} names over a million shards: check the range", option="data")
        width = max(len(lo), len(hi)) if any(b.startswith("0") and b != "0" for b in (lo, hi)) else 0  # as braceexpand pads
        choices = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern} has a brace group {{{body}}} that is neither a..b nor a,b: fix the pattern", option="data")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def is_shard_spec(spec: str) -> bool:
    return ("{" in spec or spec.lower().endswith(".tar")) and not os.path.isdir(spec)  # a folder named x.tar is a folder


class TarReader(Reader):
    """WebDataset shards read through an index of (shard, offset, size) per sample."""

    def __init__(self, pattern: str):
        super().__init__(pattern)
        paths = [Path(p) for p in expand_braces(pattern)]
        twice = [p for p, count in Counter(paths).items() if count > 1]
        if twice:  # its images would be read twice ({0,0}, or nested braces, read innermost first)
            raise DataError(f"shard pattern {pattern} names {twice[0].name} twice: name each shard once", option="data")
        missing = [p for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise DataError(f"shard pattern {pattern} matches no file (first: {paths[0]}): check the path and the brace range", option="data")
        if missing:
            raise DataError(f"shard pattern {pattern}: {len(missing)} of {len(paths)} shards are missing (first: {missing[0]}): "
                            "fix the range or restore the shards", option="data")
        self.shards = paths
        base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        self.shard_names = [Path(os.path.relpath(os.path.abspath(p), base)).as_posix() for p in paths]  # unique, short
        indexed = [entry for s, path in enumerate(paths) for entry in _index_shard(path, s)]
        self.items = [item for item, _ in indexed]  # shard, data offset, size, member name
        labels = [label for _, label in indexed]
        if not self.items:
            raise DataError(f"shards {pattern} hold no images ({', '.join(TAR_IMAGE_EXTS)} members): point data at image shards", option="data")
        self.labels, self.class_names = _label_array(labels, pattern)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # close the least recently read (a subset reads shards in order)
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open while it is among the recently read
        self._files[shard] = f  # most recently read last
        return f

    def read(self, i: int) -> np.ndarray:
        shard, offset, size, member = self.items[i]
        try:
            f = self._file(shard)
            f.seek(offset)
            data = f.read(size)
        except OSError as exc:  # the shard went away after indexing, a failing disk
            raise unreadable(f"{self.shards[shard]}:{member}", exc) from None
        if len(data) != size:
            raise DataError(f"shard {self.shards[shard]} is truncated at member {member}: re-create or re-download the shard", option="data")
        return decode(data, f"{self.shards[shard]}:{member}")

    def name(self, i: int) -> str:
        shard, _, _, member = self.items[i]
        return text_name(f"{self.shard_names[shard]}:{member}")

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


def _index_shard(path: Path, s: int):
    """(item, label text) per sample of one shard, in member order; one line when the tar is bad."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}  # in the order of their first member
    with open(path, "rb") as f:
        magic = f.read(6)
    packed = next((name for sig, name in COMPRESSED_MAGIC.items() if magic.startswith(sig)), None)
    if packed:
        raise DataError(f"{path} is a {packed}-compressed tar: WebDataset shards are read uncompressed (random access), "
                        "decompress it first", option="data")
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                twin = samples.setdefault(key, {}).setdefault(ext.lower(), member)
                if twin is not member:  # tar keeps both; one would be dropped
                    raise DataError(f"{path}: sample {text_name(key)} has two {ext.lower()} members ({text_name(twin.name)}, "
                                    f"{text_name(member.name)}): re-create the shard with unique sample keys", option="data")
            out = []
            for key, parts in samples.items():
                image_ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
                if image_ext is None and any(e in parts for e in TAR_LABEL_EXTS):  # its image is missing
                    raise DataError(f"{path}: sample {text_name(key)} has a label but no image ({', '.join(sorted(parts))}; images are "
                                    f"{', '.join(TAR_IMAGE_EXTS)}): add its image or remove the sample", option="data")
                if image_ext is None:  # not a sample (a README, metadata)
                    continue
                member = parts[image_ext]
                label_ext = next((e for e in TAR_LABEL_EXTS if e in parts), None)
                label = None
                if label_ext is not None:
                    if parts[label_ext].size > MAX_LABEL_BYTES:
                        raise DataError(f"{path}: sample {text_name(key)} has a {parts[label_ext].size}-byte label ({label_ext}), "
                                        f"at most {MAX_LABEL_BYTES} are read: a label is a class index or name, shorten it", option="data")
                    label = tar.extractfile(parts[label_ext]).read().decode("utf-8", "replace").strip()
                out.append(((s, member.offset_data, member.size, member.name), label))
            return out
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable tar shard ({first_line(exc)}): re-create or re-download it",
                        option="data") from None


def _label_array(labels: list[str | None], spec: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Integer labels as given; text labels become indices of their sorted names. All or none."""
    if all(lab is None for lab in labels):
        return None, None
    if any(lab is None for lab in labels):
        raise DataError(f"{spec}: {sum(lab is None for lab in labels)} of {len(labels)} samples have no label (cls): "
                        "label every sample or none", option="data")
    if all(re.fullmatch(r"-?\d{1,18}", lab) for lab in labels):  # whole numbers that fit int64; others are names
        return np.asarray([int(lab) for lab in labels]), None
    return class_indices(labels)


__all__ = ["TarReader", "expand_braces", "is_shard_spec"]
