"""Measured latency of a TensorRT engine on this GPU: CUDA-event timed runs, device memory, per-layer times.

References: trtexec's timing (warm-up, then CUDA-event timed enqueues, percentiles); TensorRT's
IProfiler and IExecutionContext docs. Every iteration is bracketed by CUDA events recorded on the
stream around ``execute_async_v3``, so host overhead between launches does not count; per-layer
times come from a separate run with an IProfiler attached (profiling serialises layers, so those
runs are not used for latency).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mimc.errors import ConfigError, MimcError
from mimc.latency.devices import DeviceProfile
from mimc.runtime.timing import latency_row
from mimc.runtime.trt import (bind_io, check_engine_compat, check_profile_matches_gpu, engine_batch_range, enqueue, load_engine,
                              load_sidecar, make_logger, open_gpu)


def profile_engine(engine_path: str | Path, profile: DeviceProfile, batch_sizes=None, warmup: int = 20, iters: int = 200,
                   layer_iters: int = 10, device=None, on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure a TensorRT engine on this GPU: latency percentiles, throughput, memory, per-layer times.

    ``on_message``: called with each TensorRT error line as it is logged (see :func:`make_logger`)."""
    if warmup < 0 or iters < 1 or layer_iters < 0:
        raise ConfigError(f"warmup >= 0, iters >= 1 and layer_iters >= 0 are needed (got {warmup}, {iters}, {layer_iters})")
    sidecar = load_sidecar(engine_path)
    trt, device, runtime = open_gpu(device)
    check_engine_compat(sidecar, runtime, engine_path)
    check_profile_matches_gpu(profile, runtime)
    lo, hi = engine_batch_range(sidecar)
    wanted = list(batch_sizes) if batch_sizes else list(profile.batch_sizes)
    outside = [b for b in wanted if not lo <= b <= hi]
    # The profile's own sizes beyond the engine's range are skipped and reported; sizes a user listed are not.
    explicit = bool(batch_sizes) and list(batch_sizes) != list(profile.batch_sizes)
    if explicit and outside:
        raise ConfigError(f"batch size(s) {outside} are outside the engine's range {lo}..{hi}: rebuild with `mimc build --batch {lo}:{hi}:{max(outside)}`")
    batches = [b for b in wanted if lo <= b <= hi] or [lo]

    logger = make_logger(trt, on_message)
    engine, names, inputs = load_engine(trt, logger, engine_path)
    free_before, total = device.mem_info()
    results = []
    for b in batches:
        context = engine.create_execution_context()
        if context is None:  # TensorRT returns None when it cannot allocate the context's activations
            raise MimcError(f"TensorRT could not create an execution context for {Path(engine_path).name}: "
                            f"{logger.reason(2, 'out of device memory?')}")
        bind_io(trt, engine, context, device, names, inputs, b, logger)
        for _ in range(warmup):
            enqueue(context, device.stream_handle, logger)
        device.synchronize()
        events = [(device.event(), device.event()) for _ in range(iters)]
        for start, end in events:
            device.record(start)
            enqueue(context, device.stream_handle, logger)
            device.record(end)
        device.synchronize()
        row = latency_row([device.elapsed_ms(s, e) for s, e in events], b)
        free_now, _ = device.mem_info()
        row["device_memory_used_bytes"] = max(0, free_before - free_now)
        if layer_iters:
            row["layers"] = _layer_times(trt, engine, context, device, layer_iters, logger)
        results.append(row)
        del context
        device.free()
    memory = {"engine_file_bytes": Path(engine_path).stat().st_size, "device_total_bytes": total}
    for attr in ("device_memory_size_v2", "device_memory_size"):  # TensorRT 10.1+ / older spelling
        if hasattr(engine, attr):
            memory["activation_bytes"] = int(getattr(engine, attr))
            break
    return {
        "label": "measured", "backend": "tensorrt", "model": str(engine_path), "engine": str(engine_path), "device": profile.name,
        "gpu": runtime["gpu_name"], "tensorrt_version": runtime["tensorrt_version"], "precision": sidecar.get("precision"),
        "sparse": sidecar.get("sparse"), "warmup": warmup, "iters": iters, "timing": "CUDA events around execute_async_v3",
        "skipped_batch_sizes": outside, "results": results, "memory": memory,
    }


def _layer_times(trt, engine, context, device, n: int, logger) -> list[dict[str, Any]]:
    """Mean time per layer over ``n`` profiled runs, slowest first.

    With a profiler attached and ``enqueue_emits_profile`` at its default (True), TensorRT makes
    enqueue synchronous and reports every layer to the profiler (IExecutionContext docs).
    """
    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.ms: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name, ms):
            self.ms.setdefault(layer_name, []).append(float(ms))

    profiler = context.profiler = LayerTimes()
    for _ in range(n):
        enqueue(context, device.stream_handle, logger)
        device.synchronize()
    rows = [{"layer": k, "ms": sum(v) / len(v)} for k, v in profiler.ms.items()]
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    return sorted(rows, key=lambda r: -r["ms"])


__all__ = ["profile_engine"]
