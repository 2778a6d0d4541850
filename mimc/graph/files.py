"""Graph files: read a graph with or without its weights, write one inline or with external data.

External data: protobuf refuses a message over 2 GiB, so a graph whose initializers sum past
:data:`EXTERNAL_DATA_BYTES` keeps them in ``<graph file name>.data`` beside it (the ONNX external
data format). :func:`save_graph` decides from the summed initializer bytes (never from a
serialised size, which is what fails past 2 GiB) and streams every tensor into that file one at a
time, so writing never holds a second copy of the weights; tensors another file already holds
(an exporter's output, a source graph's ``.data``) are copied from it in chunks.
"""
from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from mimc.errors import BadInputError

EXTERNAL_DATA_BYTES = 1_800_000_000
EXTERNAL_MIN_TENSOR = 1024  # smaller tensors stay in the graph file (onnx's own default)
ALIGN_OVER, ALIGN = 1 << 20, 1 << 16  # tensors of 1 MiB and more start on 64 KiB: ONNX Runtime can mmap them
_CHUNK = 1 << 24


def load_graph(model: str | Path | onnx.ModelProto, external_data: bool = True) -> onnx.ModelProto:
    """A ModelProto from a path (a loaded one passes through); a one-line BadInputError otherwise.

    ``external_data=False`` reads the graph without any weights: those kept beside it stay there,
    and those inside the graph file become external references to that file (read them with
    :func:`read_tensor` and the graph's folder), so a 1.3 GB single-file graph costs a few MB to
    read for its metadata, inputs or structure.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
    try:
        return onnx.load(str(path)) if external_data else _load_without_weights(path)
    except Exception as exc:  # onnx raises DecodeError/ValueError/OSError for a non-ONNX file; all mean the same
        raise BadInputError(f"{path} is not a readable ONNX model ({type(exc).__name__}): export it again with `mimc export MODEL`") from exc


# Protobuf wire format, just enough to step over the weights: ModelProto.graph is field 7,
# GraphProto.initializer field 5, TensorProto.raw_data field 9 (onnx/onnx.proto).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            payload = first
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 2:
            length, payload = _varint(buf, pos)
            pos = payload + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield number, wire, first, payload, pos


def _load_without_weights(path: Path) -> onnx.ModelProto:
    """The graph at ``path`` with every initializer's bytes left in a file: external ones where they
    are, in-file ones (``raw_data`` of EXTERNAL_MIN_TENSOR bytes or more) pointed at by offset into
    the graph file itself. Only the small fields are read (a memory map, touched around them)."""
    model_rest, graph_rest, tensors = bytearray(), bytearray(), []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                for number, wire, first, payload, end in _fields(buf, 0, len(buf)):
                    if number != _MODEL_GRAPH or wire != 2:
                        model_rest += buf[first:end]
                        continue
                    for g_number, g_wire, g_first, g_payload, g_end in _fields(buf, payload, end):
                        if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                            graph_rest += buf[g_first:g_end]
                            continue
                        tensors.append(_tensor_without_raw(buf, g_payload, g_end, path.name))
            finally:
                buf.release()
    model = onnx.ModelProto.FromString(bytes(model_rest))
    graph = onnx.GraphProto.FromString(bytes(graph_rest))
    graph.initializer.extend(tensors)
    model.graph.MergeFrom(graph)
    return model


def _tensor_without_raw(buf, start: int, end: int, file_name: str):
    rest, raw = bytearray(), None
    for number, wire, first, payload, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2:
            raw = (payload, stop - payload)
        else:
            rest += buf[first:stop]
    tensor = TensorProto.FromString(bytes(rest))
    if raw is None:
        return tensor
    if raw[1] < EXTERNAL_MIN_TENSOR or uses_external(tensor):
        tensor.raw_data = bytes(buf[raw[0] : raw[0] + raw[1]])
    else:
        _point_at(tensor, file_name, *raw)
    return tensor


# External data ----------------------------------------------------------------------------------
def uses_external(tensor) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _external_info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _point_at(tensor, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference to ``length`` bytes at ``offset`` of ``location``."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.data_location = TensorProto.EXTERNAL


def external_file(tensor, base_dir: str | Path) -> Path:
    """The file an external tensor's data lives in: a plain name inside ``base_dir``, never a path
    out of it (absolute, ``..``, or a symbolic link that leads elsewhere)."""
    location = _external_info(tensor).get("location", "")
    parts = Path(location).parts
    path = Path(base_dir) / location
    outside = not location or Path(location).is_absolute() or ".." in parts or "\\" in location
    if not outside and path.exists():
        outside = not path.resolve().is_relative_to(Path(base_dir).resolve())
    if outside:
        raise BadInputError(f"tensor {tensor.name!r} keeps its data at {location!r}, outside its graph's folder: "
                            "re-export the graph with `mimc export MODEL`")
    return path


def _external_span(tensor, base_dir: str | Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes, checked against the file's size."""
    src = external_file(tensor, base_dir)
    info = _external_info(tensor)
    offset = int(info.get("offset", 0))
    try:
        size = src.stat().st_size
    except OSError as exc:
        raise BadInputError(f"the external data file {src} of tensor {tensor.name!r} is missing or unreadable: "
                            "keep the .data file beside its graph, or re-export the graph") from exc
    length = int(info["length"]) if "length" in info else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(f"tensor {tensor.name!r} claims bytes {offset}..{offset + length} of {src}, which holds {size}: "
                            "the .data file is truncated or not this graph's; re-export the graph")
    return src, offset, length


def read_tensor(tensor, base_dir: str | Path | None = None) -> np.ndarray:
    """A tensor's value as numpy; external data is read from ``base_dir`` (the tensor is not changed)."""
    if not uses_external(tensor):
        return onnx.numpy_helper.to_array(tensor)
    if base_dir is None:
        raise BadInputError(f"tensor {tensor.name!r} lives in external data but no folder to read it from was given")
    data = io.BytesIO()
    _copy_external(tensor, base_dir, data)
    copy = _without(tensor, "external_data")
    copy.ClearField("data_location")
    copy.raw_data = data.getvalue()
    return onnx.numpy_helper.to_array(copy)


def tensor_bytes(tensor, base_dir: str | Path | None = None) -> int:
    """Bytes of a tensor's data, read from its fields and never from the data itself."""
    if uses_external(tensor):
        info = _external_info(tensor)
        if "length" in info:
            return int(info["length"])
        if base_dir is None:
            return 0
        return max(0, external_file(tensor, base_dir).stat().st_size - int(info.get("offset", 0)))
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    numel = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    return numel * itemsize


def initializer_bytes(model: onnx.ModelProto, base_dir: str | Path | None = None) -> int:
    """Summed data bytes of the graph's initializers, wherever they live (in the proto or beside it)."""
    return sum(tensor_bytes(t, base_dir) for t in model.graph.initializer)


def _copy_external(tensor, base_dir: str | Path, out) -> None:
    """Stream an external tensor's bytes from its file into ``out`` (an open binary file), chunk by chunk."""
    src, offset, length = _external_span(tensor, base_dir)
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(_CHUNK, left))
            if not block:
                raise BadInputError(f"{src} ended early while reading tensor {tensor.name!r}: re-export the graph")
            out.write(block)
            left -= len(block)


def _write_tensors(model: onnx.ModelProto, out, name: str, base_dir: str | Path | None, inline_only: bool) -> int:
    """Append the graph's tensors (>= EXTERNAL_MIN_TENSOR bytes, or already external) to ``out``, an
    open binary file named ``name``, one at a time, and point them there; returns how many moved.
    ``inline_only``: leave tensors that already live in external data where they are."""
    moved = 0
    for t in model.graph.initializer:
        external = uses_external(t)
        if (external and inline_only) or (not external and tensor_bytes(t) < EXTERNAL_MIN_TENSOR):
            continue
        nbytes = tensor_bytes(t, base_dir)
        if nbytes >= ALIGN_OVER and out.tell() % ALIGN:
            out.write(b"\0" * (ALIGN - out.tell() % ALIGN))
        offset = out.tell()
        if external:
            _copy_external(t, base_dir, out)
        else:
            if not t.HasField("raw_data"):  # typed fields (float_data, int64_data...) -> raw bytes
                t.raw_data = onnx.numpy_helper.to_array(t).tobytes()
            out.write(t.raw_data)
        for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data"):
            t.ClearField(field)
        _point_at(t, name, offset, out.tell() - offset)
        moved += 1
    return moved


def save_graph(model: onnx.ModelProto, path: str | Path, base_dir: str | Path | None = None,
               external: bool | None = None) -> str | None:
    """Write ``model`` to ``path``; returns the external data file's name (``<file name>.data``) or None.

    ``external`` None: external data when the initializers sum past :data:`EXTERNAL_DATA_BYTES`.
    ``base_dir``: the folder ``model``'s own external tensors (if any) are read from. ``model`` is
    consumed: its tensors end up pointing at the new file, their in-memory bytes dropped as they
    are written, so the weights are never held twice.
    """
    path = Path(path)
    if base_dir is None and any(uses_external(t) for t in model.graph.initializer):
        raise BadInputError("the graph keeps tensors in external data but no folder to read them from was given")
    if external is None:
        external = initializer_bytes(model, base_dir) > EXTERNAL_DATA_BYTES
    if not external:
        _write_inline(model, path, base_dir)
        return None
    name = f"{path.name}.data"
    with open(path.parent / name, "wb") as out:
        _write_tensors(model, out, name, base_dir, inline_only=False)
    onnx.save_model(model, str(path))
    return name


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    """The key and length prefix of a length-delimited protobuf field."""
    return _encode_varint((number << 3) | 2) + _encode_varint(length)


def _without(message, skip: str):
    """A copy of a protobuf message without one field (the field is not copied at all)."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(copy, field.name).extend(value)
        elif field.message_type is not None:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _write_inline(model: onnx.ModelProto, path: Path, base_dir: str | Path | None) -> None:
    """Serialise ``model`` as one file with every tensor's bytes inside it, streamed tensor by tensor
    from memory or from the files they live in: the whole serialised graph is never built in memory
    (a 1.3 GB graph would otherwise be held as proto, bytes and file write at once). The fields are
    written graph last, initializers last in the graph: any protobuf reader accepts that order."""
    entries = []
    for t in model.graph.initializer:
        meta, length = _without(t, "raw_data"), None  # length: of the raw bytes; None when it has none
        if uses_external(t):
            length = _external_span(t, base_dir)[2]
            del meta.external_data[:]
            meta.ClearField("data_location")
        elif t.HasField("raw_data"):
            length = len(t.raw_data)
        header = meta.SerializeToString()
        raw_part = 0 if length is None else len(_len_field(_TENSOR_RAW_DATA, length)) + length
        entries.append((t, header, length, len(header) + raw_part))
    graph_rest = _without(model.graph, "initializer").SerializeToString()
    graph_len = len(graph_rest) + sum(len(_len_field(_GRAPH_INITIALIZER, size)) + size for *_, size in entries)
    with open(path, "wb") as out:
        out.write(_without(model, "graph").SerializeToString())
        out.write(_len_field(_MODEL_GRAPH, graph_len))
        out.write(graph_rest)
        for t, header, length, size in entries:
            out.write(_len_field(_GRAPH_INITIALIZER, size))
            out.write(header)
            if length is None:
                continue
            out.write(_len_field(_TENSOR_RAW_DATA, length))
            if uses_external(t):
                _copy_external(t, base_dir, out)
            else:
                out.write(t.raw_data)


def offload_tensors(model: onnx.ModelProto, folder: str | Path, name: str) -> int:
    """Move the graph's in-memory tensors (>= EXTERNAL_MIN_TENSOR bytes) into ``folder/name`` (appended),
    leaving a small proto whose weights are read from ``folder``; returns how many moved. The
    model's other external tensors must already live in ``folder``."""
    with open(Path(folder) / name, "ab") as out:
        return _write_tensors(model, out, name, None, inline_only=True)


def check_graph(path: str | Path) -> None:
    """``onnx.checker`` on the graph at ``path`` without reading its weights: the checker loads a
    graph given by path whole (twice the weights of a single-file graph, measured), so it checks
    the structure with every weight kept outside the proto standing in as a typed graph input.
    Whether the weights load and compute right is ONNX Runtime's validation, which follows."""
    model = load_graph(path, external_data=False)
    kept = []
    for t in model.graph.initializer:
        if uses_external(t):
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            kept.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=False)


__all__ = ["load_graph", "save_graph", "offload_tensors", "read_tensor", "check_graph", "initializer_bytes", "tensor_bytes",
           "external_file", "uses_external", "EXTERNAL_DATA_BYTES"]
