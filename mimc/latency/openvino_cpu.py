"""Measured latency, throughput and peak memory of an ONNX graph or OpenVINO IR on OpenVINO's CPU plugin.

Each batch size runs in its own worker process (``python -m mimc.runtime.openvino``, through
:func:`mimc.runtime.timing.run_worker`), as for ONNX Runtime, so the memory reported is what a minimal
deployment process needs; the report also says which precision the plugin used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mimc.errors import BadInputError
from mimc.artifact import sha256_file
from mimc.latency.ort_cpu import MEMORY_METHOD, measure_batches
from mimc.graph import graph_precision, load_graph
from mimc.runtime.openvino import GRAPH_PRECISION, IR_SUFFIXES, check_precision, ir_precision, model_inputs, read, version


def profile_openvino_cpu(path: str | Path, batch_sizes: Sequence[int] | None = None, warmup: int = 10, iters: int = 50,
                         threads: int | None = None, precision: str = "fp32", on_batch=None) -> dict[str, Any]:
    """Measure ``path`` (.onnx or .xml) on OpenVINO CPU at ``precision`` (fp32/bf16: the float hint;
    a Q/DQ graph runs its quantized layers in int8 either way)."""
    path = Path(path)
    hint = check_precision(precision)  # bf16 refused before anything is measured where the CPU lacks it
    inputs = model_inputs(path)
    memory_method = MEMORY_METHOD.replace("onnxruntime", "openvino")
    run = measure_batches(path, inputs, batch_sizes, warmup, iters, threads, on_batch, memory_method,
                          module="mimc.runtime.openvino", precision=precision)
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return {
        "label": "measured",
        "model": str(path),
        "model_sha256": sha256_file(path),
        "model_bytes": path.stat().st_size + (weights.stat().st_size if weights is not None else 0),
        "backend": "openvino-cpu",
        "openvino_version": version(),
        "precision": precision,
        "compile_config": {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": run["threads"],
                           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1},
        "runtime_precision": run["results"][0].get("runtime_precision") if run["results"] else None,
        **run,
    }


def precision_for(path: str | Path, precision: str | None = None) -> str:
    """The precision ``path`` (an .onnx graph or an IR) runs at: ``precision`` checked against what
    the graph is (int8 / int8-bf16 for a Q/DQ graph, fp32 / bf16 otherwise), or, when None, its own
    (an IR's recorded precision; int8 for a quantized .onnx, else fp32). A report never names a
    precision its graph does not run."""
    path = Path(path)
    if path.suffix in IR_SUFFIXES:  # quantized: it has FakeQuantize ops (an IR built before mimc recorded its precision too)
        source = "int8" if any(op.get_type_name() == "FakeQuantize" for op in read(path).get_ops()) else "fp32"
        own = ir_precision(path)
        if GRAPH_PRECISION.get(own) != source:  # no record: the float hint it was built with, on this graph
            own = {"fp32": "int8", "bf16": "int8-bf16"}[own] if source == "int8" else own
    else:
        graph = load_graph(path, external_data=False)  # structure and dtypes only
        if any(node.op_type == "QAttention" for node in graph.graph.node):
            raise BadInputError(f"{path} is an ONNX Runtime CPU graph (QAttention), which OpenVINO cannot read: quantize it with "
                                "--device openvino-cpu (or --no-fuse-attention: plain Q/DQ)")
        source = own = graph_precision(graph)
        if source not in ("fp32", "int8"):
            raise BadInputError(f"{path} is an {source} graph; OpenVINO's CPU plugin runs fp32 and int8 ones: build or profile "
                                "model.onnx, or quantize it with --device openvino-cpu (int8)")
    if precision is None:
        return own
    if precision in GRAPH_PRECISION and GRAPH_PRECISION[precision] != source:
        fits = [p for p, g in GRAPH_PRECISION.items() if g == source]
        raise BadInputError(f"precision {precision} does not fit {path.name}, a{'n' if source == 'int8' else ''} {source} graph: "
                            f"use {' or '.join(fits)}" + (" (or quantize it first)" if source == "fp32" else ""), option="precision")
    return precision


__all__ = ["profile_openvino_cpu", "precision_for"]
