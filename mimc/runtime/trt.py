"""TensorRT on a present GPU: import and version checks, the CUDA device, the engine sidecar check,
loading an engine and binding its I/O, and :class:`EngineSession` to run one (measuring it is
:mod:`mimc.latency.tensorrt_gpu`).

References:
    NVIDIA TensorRT Developer Guide and Python API (docs.nvidia.com/deeplearning/tensorrt): Runtime,
    ICudaEngine (num_io_tensors, get_tensor_name/mode/dtype/shape), IExecutionContext (set_input_shape,
    set_tensor_address, execute_async_v3). github.com/NVIDIA/TensorRT, samples/python/common_runtime.py.
    Engines are tied to the GPU model and TensorRT version that built them, hence the sidecar.
    Python binding conventions checked against NVIDIA/TensorRT python/src/infer/pyCore.cpp (10.x): the
    runtime setters and execute_async_v3 return False on failure instead of raising; Runtime keeps its
    logger alive and an engine its runtime (keep_alive), so temporaries are safe.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, MimcError, MissingExtraError, require
from mimc.runtime.session import Port

# A device profile (mimc.latency.devices.DeviceProfile) is only read here - name, backend, batch_sizes,
# compute_capability - and never imported: runtime sits below mimc.latency.
DeviceProfile = Any

SIDECAR_FORMAT = "mimc-tensorrt-engine"
SIDECAR_VERSION = 1
INSTALL_HINT = "pip install 'mimc[gpu]'"
MIN_TENSORRT = 10
ENGINE_SUFFIXES = (".plan", ".engine")


def tensorrt_major(trt) -> int | None:
    """Major version from ``trt.__version__`` ('10.9.0.34' -> 10); None when it is unreadable."""
    m = re.match(r"\s*(\d+)", str(getattr(trt, "__version__", "")))
    return int(m.group(1)) if m else None


def import_tensorrt():
    """``tensorrt``, refused below 10: the build relies on strongly typed networks (STRONGLY_TYPED,
    10.0+) and the name-based I/O API (execute_async_v3, set_tensor_address). On 8.x the flag is
    absent, so a Q/DQ or fp16 graph would silently build as a weakly typed fp32 engine (explicit
    quantization also needed BuilderFlag.INT8 there) -- a JetPack 5 Orin or an old container has 8.x."""
    trt = require("tensorrt", "gpu", "building or running TensorRT engines")
    major = tensorrt_major(trt)
    if major is not None and major < MIN_TENSORRT:
        raise MissingExtraError(
            f"TensorRT {trt.__version__} is too old: mimc needs TensorRT >= {MIN_TENSORRT} (strongly typed networks): "
            f"pip install -U 'tensorrt>={MIN_TENSORRT}' or {INSTALL_HINT}"
        )
    return trt


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(f"{engine_path}.json")


# The GPU, through torch's CUDA runtime (torch is a core dependency; a GPU user has a CUDA build) ----------
class CudaDevice:
    """The few CUDA runtime calls profiling needs: buffers, a stream, timing events, memory info."""

    def __init__(self, index: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"no CUDA GPU is visible (torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU, a CUDA build of torch and {INSTALL_HINT}"
            )
        self._torch = torch
        self.index = index
        torch.cuda.set_device(index)
        self.name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        self.compute_capability = f"{major}.{minor}"
        self._stream = torch.cuda.Stream()
        self._buffers: list[Any] = []

    @property
    def stream_handle(self) -> int:
        return self._stream.cuda_stream

    def alloc(self, nbytes: int) -> int:
        buf = self._torch.zeros(max(1, int(nbytes)), dtype=self._torch.uint8, device=f"cuda:{self.index}")
        self._buffers.append(buf)  # kept alive until free(): TensorRT only holds the raw pointer
        # The zero fill runs on torch's current stream, TensorRT on self._stream (torch's pool streams
        # do not wait for the default stream): finish the fill before TensorRT may read the buffer.
        self._torch.cuda.current_stream(self.index).synchronize()
        return buf.data_ptr()

    def free(self) -> None:
        self._buffers.clear()
        self._torch.cuda.empty_cache()

    def event(self):
        return self._torch.cuda.Event(enable_timing=True)

    def record(self, event) -> None:
        event.record(self._stream)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def mem_info(self) -> tuple[int, int]:
        return self._torch.cuda.mem_get_info(self.index)


def open_gpu(device=None) -> tuple[Any, Any, dict[str, str]]:
    """(tensorrt, ``device`` or GPU 0, what they are: TensorRT version, GPU name, compute capability)."""
    trt = import_tensorrt()
    device = device or CudaDevice()
    return trt, device, {"tensorrt_version": trt.__version__, "gpu_name": device.name,
                         "compute_capability": device.compute_capability}


def check_profile_matches_gpu(profile: DeviceProfile, runtime: dict[str, str]) -> None:
    """Refuse to build or measure 'for h100' on an A100: the numbers would be for the wrong device."""
    if profile.backend != "tensorrt":
        raise ConfigError(f"device '{profile.name}' uses {profile.backend}, not TensorRT: pass a TensorRT device (see `mimc profiles`)")
    if profile.compute_capability and profile.compute_capability != runtime["compute_capability"]:
        raise ConfigError(
            f"device profile '{profile.name}' is compute capability {profile.compute_capability} but this GPU is "
            f"{runtime['gpu_name']} ({runtime['compute_capability']}): pass the profile of this GPU or your own YAML"
        )


def check_engine_compat(sidecar: dict[str, Any], runtime: dict[str, str], engine_path: str | Path) -> None:
    """An engine runs only on the GPU model and TensorRT version that built it: refuse others in one line."""
    name = Path(engine_path).name
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise BadInputError(f"{sidecar_path(engine_path).name} is not a mimc engine sidecar: rebuild the engine with `mimc build`")
    built_trt, here_trt = str(sidecar.get("tensorrt_version")), runtime["tensorrt_version"]
    if built_trt != here_trt:
        raise BadInputError(f"engine {name} was built with TensorRT {built_trt} but this is TensorRT {here_trt}: rebuild it here with `mimc build`")
    built_cc, here_cc = str(sidecar.get("compute_capability")), runtime["compute_capability"]
    built_gpu, here_gpu = sidecar.get("gpu_name"), runtime["gpu_name"]
    if built_cc != here_cc or built_gpu != here_gpu:
        raise BadInputError(
            f"engine {name} was built for {built_gpu} (compute capability {built_cc}) but this GPU is {here_gpu} ({here_cc}): rebuild it here with `mimc build`"
        )


def load_sidecar(engine_path: str | Path) -> dict[str, Any]:
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BadInputError(f"engine {engine_path} does not exist: build one with `mimc build MODEL.onnx --device DEVICE`")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise BadInputError(f"engine {engine_path.name} has no sidecar {side.name}: rebuild it with `mimc build` so mimc can check it fits this GPU")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"sidecar {side} is not valid JSON ({exc.msg}): rebuild the engine with `mimc build`") from exc


# TensorRT callbacks ---------------------------------------------------------------------------------
def make_logger(trt, on_message: Callable[[str], None] | None = None):
    """The process's TensorRT logger, its message list emptied: one build or profile at a time reads it.

    ``on_message`` is called with every ERROR / INTERNAL_ERROR line as it arrives (the CLI prints
    them); all non-verbose lines are kept in ``messages`` either way.

    TensorRT keeps a single logger pointer per process: a Builder or Runtime made with a different
    logger while an earlier builder, runtime or engine is alive gets the first one ("TensorRT maintains
    only a single logger pointer at any given time", NVIDIA/TensorRT#1475, #1539). A fresh logger per
    build would then miss its own build's sparsity lines, so every call returns the same object.
    VERBOSE lines are dropped: a ViT-B build emits tens of thousands (every tactic timed) and nothing
    here reads them; the sparsity report is INFO.
    """
    cached = getattr(trt, "_mimc_logger", None)
    if cached is not None:
        cached.messages.clear()
        cached.on_message = on_message
        return cached
    severity = trt.ILogger.Severity

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []
            self.on_message = on_message

        def log(self, sev, msg):
            if sev == severity.VERBOSE:
                return
            self.messages.append((sev, msg))
            if self.on_message is not None and sev in (severity.ERROR, severity.INTERNAL_ERROR):
                self.on_message(str(msg))

        def reason(self, last: int, default: str) -> str:
            """The last ``last`` error lines as one line, for a failure TensorRT reported by return value."""
            errors = [m for s, m in self.messages if s in (severity.ERROR, severity.INTERNAL_ERROR)]
            return one_line("; ".join(errors[-last:])) or default

    logger = CapturingLogger()
    trt._mimc_logger = logger  # lives as long as the module: TensorRT may call it until exit
    return logger


def one_line(text: Any) -> str:
    """TensorRT messages (parser errors especially) span lines; mimc errors are one line."""
    return " ".join(str(text).split())


_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)")


def parse_sparsity_log(messages: list[str]) -> dict[str, list[str]]:
    """TensorRT's own report of which layers could use, and which did use, sparse kernels."""
    out: dict[str, list[str]] = {"eligible": [], "picked": []}
    for msg in messages:
        for key, pattern in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            m = pattern.search(msg)
            if m:
                out[key] += [x.strip() for x in m.group(1).split(",") if x.strip()]
    return out


# Measurement ----------------------------------------------------------------------------------------
def _itemsize(trt, dtype) -> float:
    try:
        return np.dtype(trt.nptype(dtype)).itemsize
    except Exception:  # bf16 / fp8 / int4 have no numpy type: err on the large side, a short buffer would crash
        name = str(dtype).upper()
        return 1 if ("FP8" in name or "INT4" in name or "FP4" in name) else 4


def engine_batch_range(sidecar: dict[str, Any]) -> tuple[int, int]:
    first = next(iter((sidecar.get("shapes") or {}).values()), None)
    return (int(first["min"][0]), int(first["max"][0])) if first else (1, 1)


def load_engine(trt, logger, engine_path: str | Path):
    """(engine, its I/O tensor names, its input names) from an engine file."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise MimcError(f"TensorRT could not load {Path(engine_path).name}: {logger.reason(2, 'no reason given')}")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return engine, names, [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]


def bind_io(trt, engine, context, device, names: list[str], inputs: list[str], batch: int, logger) -> None:
    """Set the input shapes for ``batch`` and give every I/O tensor a device buffer.

    The setters return False (with a logged error) instead of raising: a shape outside the engine's
    optimization profile, or an address TensorRT refuses, must stop here, not as garbage timings.
    """
    for name in inputs:
        _set_input_shape(context, name, [batch, *list(engine.get_tensor_shape(name))[1:]], logger)
    for name in names:
        shape = list(context.get_tensor_shape(name))
        if any(int(d) < 0 for d in shape):  # -1 left after the inputs are set: a data-dependent output
            raise MimcError(f"tensor '{name}' has unresolved shape {shape} at batch {batch}: mimc profiles only static-shaped outputs")
        nbytes = math.prod(int(d) for d in shape) * _itemsize(trt, engine.get_tensor_dtype(name))
        if not context.set_tensor_address(name, device.alloc(nbytes)):
            raise MimcError(f"TensorRT refused the buffer for '{name}': {logger.reason(1, 'no reason given')}")


def _set_input_shape(context, name: str, shape: list, logger) -> None:
    if not context.set_input_shape(name, shape):
        raise MimcError(f"TensorRT refused input shape {shape} for '{name}': "
                        f"{logger.reason(1, 'outside the engine profile')}")


def enqueue(context, stream_handle: int, logger) -> None:
    # execute_async_v3 reports failure by returning False (TensorRT 10 Python API), not by raising.
    if not context.execute_async_v3(stream_handle):
        raise MimcError(f"TensorRT execution failed: {logger.reason(2, 'no reason given')}")


class EngineSession:
    """A TensorRT engine behind ONNX Runtime's session surface (get_inputs / get_outputs / run), so
    :class:`~mimc.runtime.onnx_model.OnnxModel` runs it like a graph: numpy in, numpy out.

    Inputs are copied to the GPU with torch and the engine runs on torch's current stream, so the
    copy is ordered before the engine reads it; outputs are read back after the stream finishes.
    ``batch_range`` is the engine's optimization profile (min, max batch): callers split and pad to it.
    """

    def __init__(self, engine_path: str | Path):
        import torch

        sidecar = load_sidecar(engine_path)
        if not torch.cuda.is_available():  # before importing TensorRT: the GPU is what is missing here
            raise DeviceUnavailableError(
                f"engine {Path(engine_path).name} runs only on an NVIDIA GPU and none is visible here (torch.cuda.is_available() "
                "is False): run on the GPU that built it, or use its .onnx graph on the CPU")
        # under torchrun, the rank's own GPU
        trt, self.device, runtime = open_gpu(CudaDevice(torch.cuda.current_device()))
        self._torch, self._trt = torch, trt
        check_engine_compat(sidecar, runtime, engine_path)
        self.logger = make_logger(trt)
        self.engine, names, self._inputs = load_engine(trt, self.logger, engine_path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise MimcError(f"TensorRT could not create an execution context for {Path(engine_path).name}: out of device memory?")
        self._outputs = [n for n in names if n not in self._inputs]
        self.batch_range = engine_batch_range(sidecar)

    def _np_dtype(self, name: str):
        try:
            return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
        except Exception:  # bf16 / fp8 I/O has no numpy type
            raise MimcError(f"engine tensor '{name}' has type {self.engine.get_tensor_dtype(name)}, which mimc cannot read back: "
                            "build the engine from an fp32 or fp16 graph") from None

    def get_inputs(self) -> list[Port]:
        types = {"float32": "tensor(float)", "float16": "tensor(float16)"}
        return [Port(n, types.get(self._np_dtype(n).name, "tensor(float)"),
                     [d if d >= 0 else None for d in self.engine.get_tensor_shape(n)]) for n in self._inputs]

    def get_outputs(self) -> list[Port]:
        return [Port(n, "tensor(float)", []) for n in self._outputs]

    def run(self, names, feed: dict):
        torch = self._torch
        stream = torch.cuda.current_stream(self.device.index)
        keep = []
        for name in self._inputs:
            x = torch.from_numpy(np.ascontiguousarray(feed[name])).to(f"cuda:{self.device.index}", non_blocking=False)
            keep.append(x)
            _set_input_shape(self.context, name, list(x.shape), self.logger)
            self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for name in self._outputs:
            shape = [int(d) for d in self.context.get_tensor_shape(name)]
            dtype = torch.from_numpy(np.empty(0, self._np_dtype(name))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device=f"cuda:{self.device.index}")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        enqueue(self.context, stream.cuda_stream, self.logger)
        stream.synchronize()
        del keep
        return [outs[n].cpu().numpy() for n in (names or self._outputs)]
