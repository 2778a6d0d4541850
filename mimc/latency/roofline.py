"""Roofline prediction of a graph's latency on a device that is not here.

References:
    Williams, Waterman, Patterson, "Roofline: an insightful visual performance model for multicore
    architectures", CACM 52(4), 2009. NVIDIA, "Accelerating Inference with Sparsity Using the NVIDIA
    Ampere Architecture and NVIDIA TensorRT" (developer.nvidia.com blog, 2021) for 2:4 sparse tensor cores.

time = sum over nodes of max(FLOPs / peak(precision of the node), bytes / bandwidth). Every node is
charged separately (no fusion, no launch overhead, no cache reuse), so the number is a model, not a
measurement: it is always labelled "predicted" and never mixed with measured numbers. Matrix products
run at the tensor/matrix peak of their precision; other ops at the device's vector (fp32) peak, which
hardly matters since they are memory-bound.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mimc.errors import ConfigError
from mimc.latency.devices import PRECISIONS, DeviceProfile
from mimc.graph import load_graph, read_nm_pattern, read_tensor
from mimc.latency.flops import count_graph
from mimc.latency.flops_costs import GraphCost, NodeCost

GEMM_WIDTH = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8-bf16": 1, "fp8": 1}  # int8-bf16: int8 matmuls


def is_nm_sparse(weight: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive weights along ``axis`` has at most ``n`` non-zeros."""
    if weight.ndim < 2 or weight.shape[axis] % m:
        return False
    w = np.moveaxis(weight, axis, -1)
    groups = (w.reshape(-1, m) != 0).sum(axis=1)
    return bool(groups.max(initial=0) <= n)


def _reduction_axis(node: NodeCost, model_nodes: dict[str, onnx.NodeProto]) -> int:
    """The axis of the weight that is summed over (where 2:4 groups must lie)."""
    proto = model_nodes.get(node.name)
    if node.kind == "conv":
        return 1
    if proto is not None and proto.op_type == "Gemm":
        trans_b = next((a.i for a in proto.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return 0  # MatMul x @ W with W (K, N): torch exports Linear weights transposed


def sparse_weights(cost: GraphCost, model: onnx.ModelProto, base_dir=None) -> set[str]:
    """Names of matmul/conv weights that really are 2:4 along their reduction axis (``base_dir``: where
    weights kept outside the proto are read from, one at a time)."""
    by_name = {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(model.graph.node)}
    found: set[str] = set()
    for node in cost.nodes:
        if node.kind not in ("matmul", "conv") or node.weight is None or node.weight not in cost.initializers:
            continue
        array = read_tensor(cost.initializers[node.weight], base_dir)
        if is_nm_sparse(array, _reduction_axis(node, by_name)):
            found.add(node.weight)
    return found


def _node_bytes(node: NodeCost, precision: str | None, other_width: float | None, sparse: bool) -> float:
    """Bytes moved by ``node``, re-priced at ``precision`` when the caller asks "what if it ran at p"."""
    total = 0.0
    for t in node.tensors:
        b = t.bytes
        if precision is not None and t.is_float:
            width = GEMM_WIDTH[precision] if node.kind in ("matmul", "conv") else other_width
            b = t.elems * width
        if sparse and t.role == "weight":
            bits = 8 * (b / t.elems if t.elems else 4)
            b *= 0.5 + 1.0 / bits  # half the values plus 2-bit indices per kept value
        total += b
    return total


def predict(onnx_path: str | Path, profile: DeviceProfile, batch: int = 1, precision: str | None = None) -> dict[str, Any]:
    """Roofline latency of ``onnx_path`` on ``profile`` at ``batch``.

    ``precision`` None reads it from the graph (Q/DQ int8 / fp8, fp16 tensors, else fp32); a value asks
    what the graph would take at that precision and must be one the device has.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose one of {PRECISIONS}")
    model = load_graph(onnx_path, external_data=False)  # dims only; weights are read when a 2:4 check needs them
    cost = count_graph(model, batch)
    used = precision or cost.precision
    if not profile.supports(used):
        origin = "the graph carries" if precision is None else "you asked for"
        raise ConfigError(
            f"{origin} {used} but device '{profile.name}' has only {', '.join(profile.precisions)}: pick a device with {used} or another precision"
        )
    notes: list[str] = []
    # fp32 GEMMs on Ampere+ tensor cores run as TF32 under TensorRT's default TF32 flag.
    gemm_fp32_as = "tf32" if profile.backend == "tensorrt" and "tf32" in profile.peak_tflops else "fp32"
    if gemm_fp32_as == "tf32" and used == "fp32":
        notes.append("fp32 matrix products priced at the TF32 tensor-core peak (TensorRT enables TF32 by default)")
    other_width = None
    if precision is not None:
        other_width = 4 if precision in ("fp32", "tf32") or not profile.supports("fp16") else 2

    nm_manifest = read_nm_pattern(onnx_path, model)
    sparse: set[str] = set()
    if profile.sparse_tensor_cores:
        sparse = sparse_weights(cost, model, Path(onnx_path).resolve().parent)
        if nm_manifest and nm_manifest != "2:4":
            notes.append(f"mimc.json says {nm_manifest}; sparse tensor cores accelerate only 2:4")
    elif nm_manifest:
        notes.append(f"weights are {nm_manifest} but {profile.name} has no sparse tensor cores: no sparsity credit")
    vector_peak = profile.peak_flops("fp32")
    bw = profile.bandwidth_bytes_per_s

    rows = []
    totals = {"compute": 0.0, "memory": 0.0}
    by_op: dict[str, dict[str, float]] = {}
    for node in cost.nodes:
        if node.kind in ("view", "fused"):
            continue
        is_sparse = node.weight in sparse
        p = precision or node.precision
        if node.kind in ("matmul", "conv"):
            p = gemm_fp32_as if p == "fp32" else p
            peak = profile.peak_flops(p, sparse=is_sparse)
        else:
            peak = vector_peak
        nbytes = _node_bytes(node, precision, other_width, is_sparse)
        t_compute = node.flops / peak
        t_memory = nbytes / bw
        bound = "compute" if t_compute >= t_memory else "memory"
        t = max(t_compute, t_memory)
        totals[bound] += t
        rows.append({"name": node.name, "op_type": node.op_type, "precision": p, "macs": node.macs, "flops": node.flops,
                     "bytes": nbytes, "time_us": t * 1e6, "bound": bound, "sparse": is_sparse})
        agg = by_op.setdefault(node.op_type, {"count": 0, "flops": 0.0, "bytes": 0.0, "time_ms": 0.0})
        agg["count"] += 1
        agg["flops"] += node.flops
        agg["bytes"] += nbytes
        agg["time_ms"] += t * 1e3
    total_s = totals["compute"] + totals["memory"]
    if cost.unknown:
        notes.append(f"{len(cost.unknown)} node(s) with unknown shapes counted as free: {', '.join(cost.unknown[:5])}")
    return {
        "label": "predicted",
        "method": "roofline: sum over nodes of max(FLOPs / peak(precision), bytes / bandwidth)",
        "onnx": str(onnx_path),
        "device": profile.name,
        "backend": profile.backend,
        "batch": batch,
        "precision": used,
        "graph_precision": cost.precision,
        "latency_ms": total_s * 1e3,
        "throughput_per_s": batch / total_s if total_s > 0 else None,  # nothing priced: no number (inf is not JSON)
        "gmacs": cost.macs / 1e9,
        "gflops": cost.flops / 1e9,
        "traffic_mb": sum(r["bytes"] for r in rows) / 1e6,
        "compute_bound_ms": totals["compute"] * 1e3,
        "memory_bound_ms": totals["memory"] * 1e3,
        "bound": "compute" if totals["compute"] >= totals["memory"] else "memory",
        "sparse": {"device_sparse_tensor_cores": profile.sparse_tensor_cores, "manifest_nm_pattern": nm_manifest,
                   "credited_weights": len(sparse)},
        "by_op": by_op,
        "nodes": rows,
        "notes": notes,
    }
