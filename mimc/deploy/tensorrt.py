"""Build a TensorRT engine from an ONNX graph for a device profile, with a JSON sidecar.

References:
    NVIDIA TensorRT Developer Guide (docs.nvidia.com/deeplearning/tensorrt): strongly typed networks
    (NetworkDefinitionCreationFlag.STRONGLY_TYPED; always on in TensorRT 11, which removed the FP16/INT8
    builder flags), explicit quantization with Q/DQ, BuilderFlag.SPARSE_WEIGHTS, optimization profiles,
    IBuilderConfig.set_memory_pool_limit, timing caches, IEngineInspector. github.com/NVIDIA/TensorRT
    (samples/python). Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv 2104.08378 (2:4).

Precision lives in the graph (DESIGN.md): fp16 by a cast graph (:func:`write_fp16_graph`), int8 / fp8
by Q/DQ nodes from ``mimc quantize``. The builder only picks shapes, sparsity, workspace and the timing
cache; :func:`builder_settings` decides all of that as a plain dict, without TensorRT, so it is tested on CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from mimc.artifact import mimc_version, now_iso, sha256_file
from mimc.atomic import atomic_file, write_json
from mimc.deploy.validate import check_gate, verdict
from mimc.errors import BadInputError, ConfigError, MimcError, require
from mimc.latency.devices import PRECISIONS, DeviceProfile
from mimc.graph import graph_precision, input_dims, load_graph, read_nm_pattern
from mimc.metrics import compare_outputs
from mimc.runtime.session import run_onnx
from mimc.runtime.trt import (SIDECAR_FORMAT, SIDECAR_VERSION, check_profile_matches_gpu, make_logger, one_line,
                              open_gpu, parse_sparsity_log, sidecar_path, tensorrt_major)

# Kept in fp32 by the fp16 writer: LayerNorm statistics and softmax overflow or lose too much in fp16.
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]


def parse_batch_range(text: str | None) -> tuple[int, int, int] | None:
    """'1:8:32' -> (1, 8, 32) (min:opt:max); '8' -> (8, 8, 8); '1:32' -> (1, 32, 32)."""
    if text is None or text == "":
        return None
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3:
        raise ConfigError(f"batch '{text}' is not MIN:OPT:MAX integers (e.g. 1:8:32)", option="batch")
    lo, opt, hi = parts[0], parts[min(1, len(parts) - 1)], parts[-1]
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"batch '{text}' must satisfy 1 <= MIN <= OPT <= MAX", option="batch")
    return lo, opt, hi


def builder_settings(profile: DeviceProfile, graph_prec: str, inputs: dict[str, list[int | None]], *,
                     precision: str | None = None, batch_range: tuple[int, int, int] | None = None,
                     workspace_gb: float = 4.0, sparse: bool | None = None, nm_pattern: str | None = None) -> dict[str, Any]:
    """Everything the builder will be told, from the profile and the graph; raises ConfigError on misuse."""
    if profile.backend != "tensorrt":
        raise ConfigError(f"device '{profile.name}' uses {profile.backend}; `mimc build` makes TensorRT engines and OpenVINO IRs: pick a TensorRT device or openvino-cpu (see `mimc profiles`)")
    precision = precision or graph_prec
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}", option="precision")
    if not profile.supports(precision):
        raise ConfigError(f"device '{profile.name}' has no {precision} (it has {', '.join(profile.precisions)}): choose one of those")
    if precision != graph_prec:
        # TensorRT 11 takes precision from the graph; only fp32 -> fp16 is a cast mimc writes here.
        if not (graph_prec == "fp32" and precision == "fp16"):
            hint = "run `mimc quantize` for int8/fp8 graphs" if precision in ("int8", "fp8") else "export a graph of that precision"
            raise ConfigError(f"the graph is {graph_prec} but precision {precision} was asked: {hint}", option="precision")
    if not 0 < workspace_gb <= profile.memory_gb:
        raise ConfigError(f"workspace_gb {workspace_gb} must be > 0 and at most the device's {profile.memory_gb} GB", option="workspace_gb")
    if sparse and not profile.sparse_tensor_cores:
        raise ConfigError(f"device '{profile.name}' has no sparse-capable tensor cores: build without sparse", option="sparse")
    notes = []
    if sparse is None:
        sparse = nm_pattern == "2:4" and profile.sparse_tensor_cores
        if nm_pattern and not sparse:
            notes.append(f"weights are {nm_pattern}; sparse weights off ({'only 2:4 is accelerated' if profile.sparse_tensor_cores else 'no sparse tensor cores'})")
    elif sparse and nm_pattern != "2:4":
        notes.append("sparse weights asked without a recorded 2:4 pattern: TensorRT uses sparse kernels only where weights happen to be 2:4")

    shapes: dict[str, dict[str, list[int]]] = {}
    for name, dims in inputs.items():
        if any(d is None for d in dims[1:]):
            raise ConfigError(f"input '{name}' has symbolic non-batch dims {dims}: export with static image size")
        rest = [int(d) for d in dims[1:]]
        if dims and dims[0] is not None:
            static = dims[0]
            if batch_range is not None and batch_range != (static, static, static):
                raise ConfigError(f"the graph has a static batch of {static}: re-export with batch dynamic to build for {':'.join(map(str, batch_range))}")
            rng = (static, static, static)
        else:
            rng = batch_range or (1, 1, max(profile.batch_sizes))
        shapes[name] = {"min": [rng[0], *rest], "opt": [rng[1], *rest], "max": [rng[2], *rest]}
    first = next(iter(shapes.values()), {"min": [1], "opt": [1], "max": [1]})
    return {
        "precision": precision,
        "write_fp16_graph": precision == "fp16" and graph_prec == "fp32",
        "network_flags": ["STRONGLY_TYPED"],  # ignored (always on) by TensorRT 11, required by TensorRT 10
        "builder_flags": ["SPARSE_WEIGHTS"] if sparse else [],
        "sparse": bool(sparse),
        "workspace_bytes": int(workspace_gb * (1 << 30)),
        "profiling_verbosity": "DETAILED",  # lets the engine inspector name each layer's tactic
        "shapes": shapes,
        "batch_range": [first["min"][0], first["opt"][0], first["max"][0]],
        "notes": notes,
    }


def write_fp16_graph(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write ``src`` cast to fp16 (LayerNorm, softmax, graph inputs/outputs kept fp32) to ``dst``.

    The cast graph is compared with ``src`` on ONNX Runtime CPU before it is kept; below the fp16
    cosine gate it raises ValidationError and nothing is written. Returns the validation report
    (``fidelity``: :meth:`mimc.metrics.Fidelity.to_dict`, and the gate's verdict).
    """
    float16 = require("onnxruntime.transformers.float16", "cpu", "writing an fp16 graph")
    model = load_graph(src)
    half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    with atomic_file(dst) as tmp:
        onnx.save(half, str(tmp))
        return fp16_fidelity(src, tmp, input_dims(model))


def fp16_fidelity(fp32_path: str | Path, fp16_path: str | Path, inputs: dict[str, list[int | None]]) -> dict[str, Any]:
    """Cosine / SQNR of the fp16 graph to the fp32 one on seeded inputs (ORT CPU); gate at fp16's."""
    rng = np.random.default_rng(0)
    # Batch 2 where the batch is dynamic, so one sample's error cannot hide in a batch mean.
    feed = {name: rng.standard_normal([d if d is not None else 2 for d in dims]).astype(np.float32) for name, dims in inputs.items()}
    try:
        ref = run_onnx(fp32_path, feed)
        half = run_onnx(fp16_path, feed)
    except Exception as exc:  # an ORT CPU build without some fp16 kernel: say so, do not guess
        return {"checked": False, "reason": f"ONNX Runtime CPU could not run the graphs ({type(exc).__name__})"}
    fidelity = compare_outputs(ref, half)
    check_gate(fidelity, "fp16", what="the fp16 graph")
    return {"checked": True, **verdict(fidelity, "fp16"), "inputs": "seeded normal, ONNX Runtime CPU"}


def build_engine(onnx_path: str | Path, profile: DeviceProfile, out_path: str | Path, batch_range=None,
                 workspace_gb: float = 4.0, timing_cache: str | Path | None = None, sparse: bool | None = None,
                 precision: str | None = None, device=None, on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build ``out_path`` (a serialized engine) and ``out_path.json`` (its sidecar); returns the sidecar.

    ``on_message``: called with each TensorRT error line as it is logged (the CLI prints them)."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = load_graph(onnx_path)
    if isinstance(batch_range, str):
        batch_range = parse_batch_range(batch_range)
    settings = builder_settings(profile, graph_precision(model), input_dims(model), precision=precision,
                                batch_range=batch_range, workspace_gb=workspace_gb, sparse=sparse,
                                nm_pattern=read_nm_pattern(onnx_path, model))
    if not out_path.parent.is_dir():
        raise BadInputError(f"output folder {out_path.parent} does not exist: create it or choose another -o")
    if timing_cache is not None and not Path(timing_cache).parent.is_dir():
        raise BadInputError(f"timing cache folder {Path(timing_cache).parent} does not exist: create it or choose another timing_cache", option="timing_cache")
    trt, device, runtime = open_gpu(device)
    check_profile_matches_gpu(profile, runtime)
    graph_file, fp16 = onnx_path, None
    if settings["write_fp16_graph"]:
        graph_file = out_path.parent / f"{onnx_path.stem}.fp16.onnx"
        fp16 = write_fp16_graph(onnx_path, graph_file)

    start = time.perf_counter()
    logger = make_logger(trt, on_message)
    serialized, cache_bytes, cache_note = _build(trt, logger, graph_file, settings, timing_cache)
    build_seconds = time.perf_counter() - start
    notes = list(settings["notes"]) + ([cache_note] if cache_note else [])
    sparsity = parse_sparsity_log([m for _, m in logger.messages])
    inspector_sparse = _inspect_sparse_tactics(trt, logger, serialized) if settings["sparse"] else None
    said = sparsity["picked"] or inspector_sparse is not None or any("(Sparsity)" in m for _, m in logger.messages)
    # None: not asked, or TensorRT said nothing either way (do not claim)
    picked = (bool(sparsity["picked"]) or bool(inspector_sparse)) if settings["sparse"] and said else None
    with atomic_file(out_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if timing_cache is not None and cache_bytes:
        with atomic_file(timing_cache) as tmp:
            tmp.write_bytes(cache_bytes)
    sidecar = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **runtime,
        "device_profile": profile.name, "precision": settings["precision"],
        "onnx": str(graph_file.resolve()), "onnx_sha256": sha256_file(graph_file),
        "network_flags": settings["network_flags"], "builder_flags": settings["builder_flags"],
        "workspace_bytes": settings["workspace_bytes"], "shapes": settings["shapes"],
        "batch_range": settings["batch_range"], "timing_cache": str(timing_cache) if timing_cache else None,
        "sparse": {"requested": settings["sparse"], "eligible_layers": sparsity["eligible"],
                   "picked_layers": sparsity["picked"], "inspector_sparse_layers": inspector_sparse, "picked": picked},
        "fp16_graph_validation": fp16, "notes": notes, "build_seconds": build_seconds, "engine_bytes": out_path.stat().st_size,
        "engine_sha256": sha256_file(out_path), "mimc_version": mimc_version(), "created": now_iso(),
    }
    write_json(sidecar_path(out_path), sidecar)
    return sidecar


def _build(trt, logger, graph_file: Path, settings: dict[str, Any], timing_cache) -> tuple[Any, bytes | None, str | None]:
    """Serialized engine, the updated timing cache (None: leave the file alone) and a note about the cache."""
    builder = trt.Builder(logger)
    flags = 0
    for flag in settings["network_flags"]:
        value = getattr(trt.NetworkDefinitionCreationFlag, flag, None)
        if value is not None:
            flags |= 1 << int(value)
        elif (tensorrt_major(trt) or 0) < 11:  # 11 made strong typing the only mode; before that the flag is the contract
            raise MimcError(f"this TensorRT ({trt.__version__}) has no NetworkDefinitionCreationFlag.{flag}: install TensorRT >= 10")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # kept alive until the build: the network uses the parser's weights
    if not parser.parse_from_file(str(graph_file)):  # from file: external weights beside the graph resolve
        errors = [one_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MimcError(f"TensorRT could not parse {graph_file.name}: {errors[0] if errors else 'no reason given'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    for flag in settings["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, settings["profiling_verbosity"])
    opt = builder.create_optimization_profile()
    for name, s in settings["shapes"].items():
        opt.set_shape(name, s["min"], s["opt"], s["max"])
    if config.add_optimization_profile(opt) < 0:  # returns the profile's index, -1 when TensorRT rejects it
        raise MimcError(f"TensorRT rejected the optimization profile {settings['shapes']}: "
                        f"{logger.reason(1, 'no reason given')}")
    cache, note = _attach_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MimcError(f"TensorRT failed to build an engine from {graph_file.name}: "
                        f"{logger.reason(2, 'see the log above')}")
    cache_bytes = None
    if cache is not None:
        updated = config.get_timing_cache()
        cache_bytes = bytes(updated.serialize()) if updated is not None else None
    return serialized, cache_bytes, note


def _attach_timing_cache(config, timing_cache) -> tuple[Any, str | None]:
    """Load ``timing_cache`` (or start an empty one) into ``config``.

    TensorRT signals an unusable cache file without raising: ``create_timing_cache`` returns None for
    a blob it cannot read, and ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a
    cache from another GPU or TensorRT version (IBuilderConfig / ITimingCache docs: a cache is only
    valid for the exact TensorRT version and device properties that made it). Such a file is not
    used and not overwritten (it may be another machine's); the build goes on with a fresh in-memory
    cache and says so in the sidecar notes.
    """
    if timing_cache is None:
        return None, None
    path = Path(timing_cache)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, None
    fresh = config.create_timing_cache(b"") if data else None  # an empty cache that failed cannot be retried
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise MimcError("TensorRT could not create an empty timing cache: build without timing_cache", option="timing_cache")
    return None, (f"timing cache {path.name} was made by another TensorRT version or GPU (or is damaged): "
                  "built without it and left the file unchanged; give a new timing_cache path to keep one for this machine")


def _inspect_sparse_tactics(trt, logger, serialized) -> list[str] | None:
    """Layers whose chosen tactic is a sparse kernel, per the engine inspector (None if it cannot say)."""
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # no GPU context for deserialising, or an older inspector: the log still reports
        return None
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return [str(layer.get("Name")) for layer in layers if isinstance(layer, dict) and "sparse" in str(layer.get("TacticName", "")).lower()]
