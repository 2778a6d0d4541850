"""Measured latency of an ONNX graph on ONNX Runtime's CUDA provider (onnxruntime-gpu).

References:
    ONNX Runtime CUDA Execution Provider and I/O binding (onnxruntime.ai/docs/execution-providers/
    CUDA-ExecutionProvider.html, onnxruntime.ai/docs/performance/tune-performance/iobinding.html);
    github.com/microsoft/onnxruntime (onnxruntime/python/tools/transformers/benchmark_helper.py).

Inputs and outputs are bound to GPU memory once (I/O binding), so the timed loop measures the graph
and not host-device copies. ``run_with_iobinding`` returns after the GPU work is done, so wall-clock
time per call is the latency.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, require
from mimc.runtime.session import session_options
from mimc.runtime.timing import DTYPES, latency_row
from mimc.runtime.trt import DeviceProfile

PROVIDER = "CUDAExecutionProvider"


def _load_cuda_libraries(ort) -> None:
    """Make CUDA/cuDNN loadable before the CUDA provider is created.

    onnxruntime-gpu (1.19+, CUDA 12 / cuDNN 9 wheels) does not bundle CUDA or cuDNN; its docs
    (CUDA Execution Provider, "Compatibility with PyTorch" / preload_dlls, onnxruntime 1.21+) say
    importing a compatible CUDA torch first is enough, else ``onnxruntime.preload_dlls()`` loads them
    from the nvidia-* pip packages. Without either, the provider fails to load and ORT silently
    falls back to the CPU, which :func:`cuda_session` then reports.
    """
    import torch

    if torch.version.cuda is None:  # a CUDA torch loaded libcudart / libcudnn at import
        # best effort (no preload_dlls before 1.21): the provider check below gives the actionable message
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def cuda_session(onnx_path: str | Path, device_id: int = 0, threads: int | None = None):
    """An ORT session on the CUDA provider (CPU provider behind it for unsupported nodes, with
    ``threads`` intra-op threads), or a one-line DeviceUnavailableError saying why not."""
    ort = require("onnxruntime", "gpu", "profiling on ONNX Runtime's CUDA provider")
    if PROVIDER not in ort.get_available_providers():
        raise DeviceUnavailableError(
            f"ONNX Runtime has no CUDA provider here (providers: {', '.join(ort.get_available_providers())}): "
            "on a machine with an NVIDIA GPU, pip uninstall onnxruntime && pip install 'mimc[gpu]'"
        )
    if not Path(onnx_path).is_file():
        raise BadInputError(f"ONNX file {onnx_path} does not exist: export one with `mimc export`")
    _load_cuda_libraries(ort)
    options = {"sess_options": session_options(threads)} if threads else {}
    sess = ort.InferenceSession(str(onnx_path), providers=[(PROVIDER, {"device_id": device_id}), "CPUExecutionProvider"], **options)
    if sess.get_providers()[0] != PROVIDER:  # ORT falls back silently when CUDA cannot initialise
        raise DeviceUnavailableError(
            f"ONNX Runtime could not start the CUDA provider (got {sess.get_providers()}): install CUDA and cuDNN "
            "libraries matching onnxruntime-gpu (a CUDA build of torch provides them)"
        )
    return sess


def measure_session(sess, batch: int, warmup: int, iters: int, device: str = "cuda", device_id: int = 0,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time ``sess`` at ``batch`` with inputs and outputs bound on ``device`` ('cuda' or 'cpu')."""
    import onnxruntime as ort

    binding = sess.io_binding()
    rng = np.random.default_rng(0)
    for inp in sess.get_inputs():
        shape = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(inp.shape)]
        if any(not isinstance(d, int) for d in shape):
            raise ConfigError(f"input '{inp.name}' has symbolic dims {inp.shape}: export with a static image size")
        if shape and shape[0] != batch:
            raise ConfigError(f"input '{inp.name}' has a static batch of {shape[0]}, not {batch}: export with a dynamic batch")
        data = rng.standard_normal(shape).astype(DTYPES.get(inp.type, np.float32))
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(data, device, device_id))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, device_id)
    for _ in range(warmup):
        sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    samples = []
    for _ in range(iters):
        t0 = clock()
        sess.run_with_iobinding(binding)
        # Run() already waits for the provider's stream unless a run option disables it; waiting on the
        # bound outputs as well (IOBinding.synchronize_outputs) keeps the clock honest if that changes.
        binding.synchronize_outputs()
        samples.append((clock() - t0) * 1e3)
    return latency_row(samples, batch)


def profile_onnx_cuda(onnx_path: str | Path, profile: DeviceProfile, batch_sizes=None, warmup: int = 20,
                      iters: int = 200, device_id: int = 0) -> dict[str, Any]:
    """Measured latency percentiles and throughput per batch size on ORT's CUDA provider."""
    if warmup < 0 or iters < 1:
        raise ConfigError(f"warmup >= 0 and iters >= 1 are needed (got {warmup}, {iters})")
    sess = cuda_session(onnx_path, device_id)
    batches = list(batch_sizes or profile.batch_sizes)
    results = [measure_session(sess, b, warmup, iters, "cuda", device_id) for b in batches]
    import torch

    memory = {}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device_id)
        memory = {"device_free_bytes": free, "device_total_bytes": total}
    return {"label": "measured", "backend": "onnxruntime-cuda", "model": str(onnx_path), "onnx": str(onnx_path), "device": profile.name,
            "warmup": warmup, "iters": iters, "timing": "wall clock around run_with_iobinding (synchronous)",
            "results": results, "memory": memory}
