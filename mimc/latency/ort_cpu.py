"""Measured latency, throughput and peak memory of an ONNX graph on ONNX Runtime's CPU provider.

Reads the graph's inputs here, then measures each batch size in its own worker process
(:func:`mimc.runtime.timing.run_worker`), so the memory reported is what a minimal deployment process
needs for that graph and batch. See :mod:`mimc.runtime.timing` for the timing method.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from mimc.artifact import sha256_file
from mimc.errors import BadInputError
from mimc.graph import graph_inputs, load_graph, metadata
from mimc.runtime.timing import DTYPES, host_info, run_worker
from mimc.runtime.session import onnxruntime, onnxruntime_distribution

MEMORY_METHOD = (
    "peak RSS (VmHWM) of a fresh worker process per batch size that loads only onnxruntime + numpy; "
    "session_mb = peak minus the RSS just before the session was created"
)


def input_specs(inputs: list[dict[str, Any]], batch: int, path: str | Path) -> list[dict[str, Any]]:
    """Concrete shapes for ``batch``; refuses a static batch that differs or other symbolic axes."""
    specs = []
    for inp in inputs:
        shape = list(inp["shape"])
        if not shape:
            raise BadInputError(f"input '{inp['name']}' of {path} is a scalar: profile a graph with batched inputs")
        if not shape[0]:  # symbolic (None) or 0
            shape[0] = batch
        elif shape[0] != batch:
            raise BadInputError(
                f"{path} has a static batch of {shape[0]}: profile it with batch_sizes {shape[0]} or re-export with batch dynamic",
                option="batch_sizes",
            )
        if not all(shape[1:]):
            raise BadInputError(f"input '{inp['name']}' of {path} has symbolic axes beyond the batch {inp['shape']}: export with static image size")
        if inp["dtype"] not in DTYPES:
            raise BadInputError(f"input '{inp['name']}' of {path} has unsupported type {inp['dtype']}: profile a float graph")
        specs.append({"name": inp["name"], "dtype": inp["dtype"], "shape": shape})
    return specs


def layout_note(model) -> str | None:
    """A Q/DQ graph quantized for TensorRT runs on ONNX Runtime CPU only as an emulation: say so."""
    try:
        target = json.loads(metadata(model).get("mimc_quantization", "{}")).get("target")
    except json.JSONDecodeError:
        return None
    if target == "tensorrt":
        return ("this graph's Q/DQ layout is built for TensorRT: ONNX Runtime CPU runs it as an emulation, so this is not "
                "int8 CPU latency; for that, quantize for the cpu target")
    return None


def static_batch(inputs: list[dict[str, Any]]) -> int | None:
    """The graph's fixed batch size, or None when the batch axis is dynamic."""
    first = inputs[0]["shape"][0] if inputs[0]["shape"] else None
    return first or None


def measure_batches(path: Path, inputs: list[dict[str, Any]], batch_sizes, warmup: int, iters: int, threads,
                    on_batch=None, memory_method: str = MEMORY_METHOD, **worker) -> dict[str, Any]:
    """A CPU report's measurement: its settings, the host and one result per batch size, every batch
    size's shapes checked before any is timed; each is timed in its own worker process (``worker``:
    the runtime module and its options)."""
    batch_sizes = list(batch_sizes) if batch_sizes else [static_batch(inputs) or 1]
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise BadInputError(f"batch_sizes must be positive integers, got {batch_sizes}: e.g. 1 and 8", option="batch_sizes")
    plans = [input_specs(inputs, b, path) for b in batch_sizes]  # refuse before measuring anything
    threads = int(threads) if threads else (os.cpu_count() or 1)
    if threads < 1:
        raise BadInputError(f"threads must be >= 1, got {threads}: e.g. threads 2", option="threads")
    results = []
    for b, specs in zip(batch_sizes, plans):
        if on_batch is not None:
            on_batch(b)
        results.append(run_worker(path, specs, warmup, iters, threads, **worker))
    return {"threads": threads, "warmup": warmup, "iters": iters,
            "inputs": {i["name"]: {"dtype": i["dtype"], "shape": i["shape"]} for i in inputs},
            "memory_method": memory_method, "host": host_info(), "results": results}


def profile_onnx_cpu(onnx_path: str | Path, batch_sizes: Sequence[int] | None = None, warmup: int = 10, iters: int = 50,
                     threads: int | None = None, on_batch=None) -> dict[str, Any]:
    """Measure ``onnx_path`` on ORT CPU for each batch size; returns a report labelled "measured".

    ``batch_sizes`` None: the graph's static batch, or 1 when it is dynamic. ``on_batch(batch)`` is
    called before each measurement (progress display).
    """
    path = Path(onnx_path)
    ort = onnxruntime()
    model = load_graph(path, external_data=False)
    inputs = graph_inputs(model, path)
    note = layout_note(model)
    del model  # the workers load the graph themselves
    run = measure_batches(path, inputs, batch_sizes, warmup, iters, threads, on_batch)
    return {
        "label": "measured",
        "model": str(path),
        "model_sha256": sha256_file(path),
        "model_bytes": path.stat().st_size,
        "backend": "onnxruntime-cpu",
        "provider": "CPUExecutionProvider",
        "onnxruntime_version": ort.__version__,
        "onnxruntime_distribution": onnxruntime_distribution(),
        "threads": run["threads"],
        "session_options": {"session.intra_op.allow_spinning": "0", "inter_op_num_threads": 1, "execution_mode": "sequential"},
        **run,
        **({"note": note} if note else {}),
    }


__all__ = ["profile_onnx_cpu", "input_specs", "layout_note", "static_batch", "MEMORY_METHOD"]
