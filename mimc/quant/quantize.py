"""Calibrated INT8 / FP8 quantization of an exported encoder graph (a graph-level stage).

``quantize_onnx(onnx_in, onnx_out, calibration_batches, QuantizeConfig(...))`` folds outliers
(optional SmoothQuant / RepQ), calibrates activation ranges on the fp32 graph, rewrites the graph
for its target, measures fidelity to the fp32 graph on held-out inputs, gates it per precision and
only then writes ``onnx_out`` (atomically, with mimc metadata stamped into the graph).

Targets (the graph is chosen for where it runs):
- ``tensorrt``: explicit Q/DQ as TensorRT's strongly typed networks expect: W8A8 symmetric,
  weights per output channel, activations per tensor, one shared Q/DQ per LayerNorm output, on
  qkv / proj / fc1 / fc2 (attention matmuls by flag: TensorRT does not fuse INT8 MHA beyond 512
  tokens). FP8 E4M3 the same way at opset 19.
- ``cpu`` (ONNX Runtime CPU, VNNI): static u8 activations x s8 per-channel weights. proj / fc1 /
  fc2 are ``MatMulIntegerToFloat`` (bias fused) fed by one static ``QuantizeLinear`` per activation
  tensor; qkv and the float attention core of each block are one ``QAttention`` kernel
  (mimc/quant/ort_fusion.py; ``fuse_attention=False`` keeps them apart, bit-identical output).

  Where the time goes (ViT-B/16, batch 1, 2 threads, ORT 1.32 profiler, kernel ms per image):
  quantize_dynamic 79.6 = DynamicQuantizeMatMul 49.2 + float attention nodes (FusedMatMul,
  MatMul, Softmax, Transpose, Split, Squeeze) 17.3 + ConvInteger 5.0 + the rest; mimc 70.2 =
  MatMulIntegerToFloat 35.8 + QAttention 23.6 + GELU 2.9 + QuantizeLinear 2.2 + LayerNorm 2.1 +
  residual Add 1.6 + float patch Conv 1.2. The integer GEMM itself is the same MLAS u8 x s8 kernel
  either way (one 197 x 768 x 3072 GEMM, best of 150: MatMulIntegerToFloat per-channel 1.16 ms,
  DynamicQuantizeMatMul 1.12 ms, ~820 GOP/s), so mimc's margin comes from the graph around it: the
  fused attention (a dozen kernel launches and thread-pool hand-offs per block fewer), the patch
  embedding kept float (ORT's ConvInteger is 4x slower than its float Conv here), and static scales
  (no per-call min/max). benchmarks/bench_quantize_vitb.py measures fp32, both onnxruntime dynamic
  recipes, quantize_static and the mimc variants in one run (numbers in README).

  Measured and not taken: Add + LayerNorm as ``SkipLayerNormalization`` (slower here and not
  bit-identical); ``MultiHeadAttention`` after the int8 qkv GEMM (same speed as QAttention, not
  bit-identical); s8 activations (MatMulIntegerToFloat s8 x s8 0.35x: VNNI's vpdpbusd is u8 x s8);
  quantize_static QOperator (QLinearMatMul: u8 output re-dequantized plus a separate bias Add).
  Int8 attention matmuls (``--attention``) cannot live inside QAttention (its attention is float);
  they were no faster than the fused float attention at 224 px and cost 2-5 dB SQNR on `ref`
  (benchmarks/results/ref_quantize_table.json), so they stay opt-in.

  Why a hand-built graph rather than onnxruntime.quantization.quantize_static: it cannot put static
  scales on the attention matmuls' two activations, it does not fuse attention, and its histogram
  calibrators hold every intermediate output in memory (see calibrate.py). onnxruntime.quantization
  stays the baseline the benchmark compares against.
- ``openvino`` (OpenVINO CPU plugin): plain Q/DQ as for tensorrt, which OpenVINO reads as FakeQuantize
  and runs as int8 kernels, plus the patch-embedding Conv; a non-negative activation (softmax
  probabilities) is u8 with zero point 0, not s8 (pooled cosine on `ref` 0.986 -> 0.996), and
  ``overflow_fix`` writes 7-bit weights for CPUs without VNNI (qdq_graph.rewrite_qdq). Why, what it
  covers against NNCF and how the layout is chosen: README, "int8 for OpenVINO".

Graphs past 2 GiB (README, "Big encoders"): the weights stay on disk, linked into the run's scratch
folder (:func:`_workspace`), and ONNX Runtime sessions hold them one at a time.

References:
- Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", CVPR 2018 (affine u8 quantization); NVIDIA TensorRT "Working with Quantized Types"
  (explicit Q/DQ placement); Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433.
- microsoft/onnxruntime: contrib ops MatMulIntegerToFloat and QAttention (onnxruntime/contrib_ops/cpu/quantization).
- NVIDIA/TensorRT-Model-Optimizer: ViT FP8 recipe (LayerNorm/softmax/GELU/residuals kept float).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, version_converter

from mimc.artifact import mimc_version, sha256_file, verify_graph
from mimc.atomic import claim_output, sweep_stale_temps, writing
from mimc.errors import BadInputError, DataError, ValidationError
from mimc.graph import (check_graph, external_file, is_mimc_graph, load_graph, metadata, offload_tensors, save_graph,
                        single_input, token_reduced, uses_external)
from mimc.quant.calibrate import as_arrays, collect_channel_ranges, collect_ranges
from mimc.quant.gate import graph_outputs, measure_fidelity, runnable_here
from mimc.quant.ort_fusion import fuse_attention_cpu
from mimc.quant.fold_graph import fold_pairs, norm_linear_pairs
from mimc.quant.qdq_graph import attention_sites, conv_sites, linear_sites, opset, rewrite_cpu, rewrite_qdq, GraphIndex
from mimc.quant.config import QuantizeConfig

FP8_OPSET = 19
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
                       "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "ConvInteger", "QLinearConv"})


# Input checks -------------------------------------------------------------------------------------
def _check_paths(onnx_in: Path, onnx_out: Path) -> None:
    if not onnx_in.is_file():
        raise BadInputError(f"ONNX file {onnx_in} does not exist: export one with `mimc export MODEL`")
    if onnx_out.suffix != ".onnx":
        raise BadInputError(f"output {onnx_out} must end in .onnx: choose a path like model.int8.onnx")
    if not onnx_out.parent.is_dir():
        raise BadInputError(f"output folder {onnx_out.parent} does not exist: create it or choose another output path")
    if onnx_out.is_dir():
        raise BadInputError(f"output {onnx_out} is a directory: give a file path like model.int8.onnx", option="output")
    if onnx_out.resolve() == onnx_in.resolve():
        raise BadInputError(f"output {onnx_out} is the input graph: choose another output path (inputs are never modified)")


def load_float_graph(onnx_in: Path):
    """The fp32 mimc graph at ``onnx_in``, its weights kept beside it left on disk."""
    model = load_graph(onnx_in, external_data=False)
    if not is_mimc_graph(onnx_in, model):
        raise BadInputError(f"{onnx_in} is not a mimc graph (no mimc metadata, no mimc.json beside it): export it with `mimc export MODEL`")
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    if quantized:
        raise BadInputError(f"{onnx_in} is already quantized ({', '.join(quantized)}): quantize the fp32 model.onnx instead")
    return model


def calibration_hash(arrays: list[np.ndarray]) -> str | None:
    """sha256 of the concatenated pixels: equals mimc.data.ImageSet.sha256 for the same images."""
    if not arrays:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.concatenate(arrays)).tobytes()).hexdigest()


# Weights on disk -------------------------------------------------------------------------------------
def _workspace(model, src_dir: Path, work: Path) -> None:
    """Make every weight of ``model`` readable from the scratch folder ``work``: the external data
    files beside the source graph hard-linked there (copied across file systems), weights held in
    the proto moved to a file there. Afterwards the proto is small and ``work`` is its base_dir."""
    for t in model.graph.initializer:
        if not uses_external(t):
            continue
        src = external_file(t, src_dir)  # refuses a location outside the source graph's folder
        dst = work / src.relative_to(src_dir)
        if dst.exists():
            continue
        if not src.is_file():
            raise BadInputError(f"{src}, the external data of the graph, is missing: keep the .data file beside its graph "
                                "or export the graph again")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed: a streamed copy
            shutil.copyfile(src, dst)
    offload_tensors(model, work, _fresh_name(work, "mimc-inline"))


def _fresh_name(folder: Path, stem: str) -> str:
    k = 0
    while (folder / f"{stem}-{k}.data").exists():
        k += 1
    return f"{stem}-{k}.data"


# The stage ----------------------------------------------------------------------------------------
def quantize_graph(model, calibration: list[np.ndarray], config: QuantizeConfig, base_dir: str | os.PathLike | None = None,
                   scratch: bool = False, overflow_fix: str | None = None, cache: dict | None = None) -> tuple[Any, dict[str, Any]]:
    """fp32 ModelProto -> quantized ModelProto (a new message) and what was done.

    ``base_dir``: the folder the graph's external-data tensors live in (a graph past 2 GiB);
    ``scratch``: that folder is mimc's own scratch space, where outlier folding may put the weights
    it rewrites (otherwise they stay in the returned proto). ``overflow_fix``: overrides the
    config's (openvino target); ``cache``: a dict kept between calls on the same graph and
    calibration, so a second layout reuses the first one's calibration passes.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)  # never touch the caller's graph (no serialisation: a proto past 2 GiB copies too)
    model = work
    info: dict[str, Any] = {}
    cache = {} if cache is None else cache
    idx = GraphIndex.build(model, base_dir)
    sites = linear_sites(idx)
    if not sites:
        raise BadInputError("the graph has no MatMul with constant weights to quantize: is this an exported mimc encoder?")
    if config.smooth is not None or config.repq:
        pairs = norm_linear_pairs(idx, sites)
        if "channel" not in cache:
            cache["channel"] = collect_channel_ranges(model, [ln.output[0] for ln, _ in pairs], calibration, base_dir)
        fold_pairs(model, pairs, cache["channel"], config.smooth, config.repq,
                   symmetric=config.resolved_target != "cpu", base_dir=base_dir)
        if scratch and base_dir is not None:
            offload_tensors(model, base_dir, _fresh_name(Path(base_dir), "mimc-folded"))  # the proto stays small
    if config.precision == "fp8":
        model = _to_opset(model, FP8_OPSET)
    idx = GraphIndex.build(model, base_dir)  # folding and the opset conversion rewrote the graph
    sites = linear_sites(idx)
    attn = attention_sites(idx) if config.quantize_attention_matmuls else []
    convs = conv_sites(idx) if config.resolved_target == "openvino" else []
    acts = [s.act for s in sites] + [i for n in attn for i in n.input] + [n.input[0] for n in convs]
    kl_levels = 256 if config.resolved_target == "cpu" else 128  # u8 asymmetric vs symmetric int8 / fp8
    # Attention probabilities are power-law distributed: percentile or entropy calibration clips
    # exactly the few large weights that matter (measured on `ref`: entropy fell from 46 to 29 dB
    # SQNR). Keep their observed range; it is at most [0, 1] and finer than a fixed [0, 1]
    # (fixed [0, 1] as ModelOpt uses cost ~6 dB on `ref`).
    if "ranges" not in cache:
        cache["ranges"] = collect_ranges(model, acts, calibration, config.method, config.percentile, kl_levels,
                                         observed=_softmax_outputs(idx, attn), base_dir=base_dir)
    ranges, images = cache["ranges"]
    if config.resolved_target == "cpu":
        rewrite_cpu(model, sites, attn, ranges)
        if config.fuse_attention and not attn:
            info.update(fuse_attention_cpu(model, base_dir))
    else:
        fix = overflow_fix or config.resolved_overflow_fix
        rewrite_qdq(model, sites, attn, ranges, config.precision, convs, unsigned=config.resolved_target == "openvino", index=idx,
                    overflow_fix=fix)
        if config.resolved_target == "openvino":
            info["overflow_fix"] = fix
    info.update({"quantized_linears": len(sites), "quantized_attention_matmuls": len(attn),
                 **({"quantized_convs": len(convs)} if convs else {}),
                 "activation_tensors": len(set(acts)), "calibration_images": images})
    return model, info


def overflow_fixes(config: QuantizeConfig) -> list[str | None]:
    """The layouts quantize_onnx builds and judges: one, or both first_layer (NNCF's default; 8-bit
    weights keep more precision) and all where overflow_fix is left to mimc on a CPU without VNNI."""
    if config.overflow_fix is None and config.resolved_overflow_fix == "all":
        return ["first_layer", "all"]
    return [None]


def _softmax_outputs(idx: GraphIndex, attn_nodes: list) -> list[str]:
    return [n.input[0] for n in attn_nodes if (p := idx.producer.get(n.input[0])) is not None and p.op_type == "Softmax"]


def _to_opset(model, target: int):
    current = opset(model)
    if current >= target:
        return model
    try:
        return version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise BadInputError(f"cannot raise the graph from opset {current} to {target} for FP8 "
                            f"({str(exc).splitlines()[0][:200]}): re-export with opset {target}",
                            option="opset") from exc


def _stamp(model, config: QuantizeConfig, info: dict[str, Any], calib_sha: str | None, source_sha: str) -> None:
    meta = {
        **metadata(model),
        "mimc_version": mimc_version(),
        "mimc_precision": config.precision,
        "mimc_quantization": json.dumps({"config": config.to_dict(), "target": config.resolved_target,
                                         "calibration_sha256": calib_sha, "source_onnx_sha256": source_sha,
                                         **info}, sort_keys=True),
    }
    helper.set_model_props(model, dict(sorted(meta.items())))
    model.producer_name, model.producer_version = "mimc", mimc_version()


def quantize_onnx(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, calibration_batches: Iterable,
                  config: QuantizeConfig, eval_batches: Iterable | None = None, force: bool = False,
                  on_commit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Quantize an fp32 mimc graph; returns the report (also stamped into the graph's metadata).

    ``eval_batches`` are held-out inputs for the fidelity gate (not the calibration images); when
    None, seeded normal inputs stand in (labelled so in the report).
    """
    from mimc.deploy.validate import gate_failures, verdict

    start = time.perf_counter()
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    _check_paths(onnx_in, onnx_out)
    if config.resolved_target == "openvino":
        from mimc.runtime.openvino import openvino

        openvino()  # not installed: the install hint, before any work
    source_sha = verify_graph(onnx_in) or sha256_file(onnx_in)  # a listed graph (and its .data) as recorded
    source = onnx_in.resolve()  # a symlinked graph: its weights are read where the file really is
    model = load_float_graph(source)
    calibration = as_arrays(calibration_batches)
    if calibration and sum(a.shape[0] for a in calibration) > config.n:
        calibration = [np.concatenate(calibration)[: config.n]]  # at most n images, the first ones given
    _, graph_batch, shape = single_input(model)
    held_out = as_arrays(eval_batches)
    eval_source = "held-out images"
    if not held_out:
        rng = np.random.default_rng(0)
        held_out = [rng.standard_normal((max(graph_batch or 1, 4), *shape)).astype(np.float32)]
        eval_source = "seeded normal inputs (no held-out images given)"
    n_held = sum(a.shape[0] for a in held_out)
    if graph_batch and n_held < graph_batch:  # not one full batch to compare on
        raise DataError(f"the graph has a static batch of {graph_batch} but only {n_held} held-out images to gate it on: "
                        f"export it with batch {n_held} or less, or dynamic")
    pooled_only = token_reduced(model)
    runnable, why = runnable_here(config)
    sweep_stale_temps(onnx_out.parent, onnx_out.name)  # a killed run's temp folder (its pid is gone)
    with writing(onnx_out), claim_output(onnx_out), tempfile.TemporaryDirectory(prefix=f".{onnx_out.name}.{os.getpid()}.", suffix=".tmp", dir=onnx_out.parent) as tmp_dir:
        work = Path(tmp_dir) / "work"
        work.mkdir()
        _workspace(model, source.parent, work)
        calib_sha = calibration_hash(calibration)
        reference = graph_outputs(onnx_in, held_out)
        cache: dict = {}
        built = []  # (fidelity, gated outputs, graph, its external data, info), one per overflow-fix layout
        for k, fix in enumerate(overflow_fixes(config)):
            quantized, info = quantize_graph(model, calibration, config, base_dir=work, scratch=True, overflow_fix=fix, cache=cache)
            _stamp(quantized, config, info, calib_sha, source_sha)
            graph_opset = opset(quantized)
            (Path(tmp_dir) / f"c{k}").mkdir()
            tmp = Path(tmp_dir) / f"c{k}" / onnx_out.name
            data = save_graph(quantized, tmp, base_dir=work)  # external data when the initializers sum past the limit
            del quantized
            check_graph(tmp)  # the structure, without reading the weights
            built.append((*measure_fidelity(onnx_in, tmp, held_out, config, pooled_only=pooled_only, reference=reference),
                          tmp, data, info))
        del model
        shutil.rmtree(work)
        # more than one layout (openvino, overflow fix left to mimc on a CPU without VNNI): the one
        # OpenVINO runs most faithfully here, by the SQNR the gate judges
        fidelity, gated_outputs, tmp, data, info = max(built, key=lambda b: b[0].worst_sqnr_db or -np.inf)
        measured_fixes = {b[4]["overflow_fix"]: round(b[0].worst_sqnr_db or 0.0, 2) for b in built} if len(built) > 1 else None
        failures = gate_failures(fidelity, config.precision)
        if failures and not force:
            raise ValidationError(f"quantized graph fails the {config.precision} fidelity gate ({'; '.join(failures)}): "
                                  "nothing written; try smooth 0.5, method percentile or a larger n, or keep it anyway with force",
                                  option=("smooth", "method", "n", "force"))
        report = {
            "kind": "onnx", "file": onnx_out.name, "path": str(onnx_out), "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size, "external_data": data,
            "external_data_bytes": (tmp.parent / data).stat().st_size if data else 0,
            "external_data_sha256": sha256_file(tmp.parent / data) if data else None,
            "precision": config.precision, "target": config.resolved_target,
            "method": config.method, "n": config.n, "calibration_images": info["calibration_images"],
            "calibration_sha256": calib_sha, "smoothing": {"smooth_alpha": config.smooth, "repq": config.repq},
            "quantized_linears": info["quantized_linears"], "quantized_attention_matmuls": info["quantized_attention_matmuls"],
            **({"quantized_convs": info["quantized_convs"], "overflow_fix": info["overflow_fix"],
                "overflow_fix_sqnr_db": measured_fixes} if "overflow_fix" in info else {}),
            "fused_attention_blocks": info.get("fused_attention_blocks", 0), "unfused_attention": info.get("unfused_attention", {}),
            "source": {"file": onnx_in.name, "sha256": source_sha},
            "validation": {**verdict(fidelity, config.precision, failures), "reference": "fp32 graph", "inputs": eval_source,
                           "gated_outputs": gated_outputs},
            "runnable_here": runnable, "runnable_note": why, "opset": graph_opset,
            "config": config.to_dict(), "config_version": config.version, "mimc_version": mimc_version(),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if on_commit is not None:  # e.g. the artifact's record, written before the graph appears
            on_commit(report)
        if data:
            os.chmod(tmp.parent / data, 0o644)  # readable like the graph
            os.replace(tmp.parent / data, onnx_out.parent / data)
        os.replace(tmp, onnx_out)
    return report


__all__ = ["QuantizeConfig", "quantize_onnx", "quantize_graph", "measure_fidelity", "graph_outputs", "load_float_graph"]
