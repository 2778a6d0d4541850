"""OpenVINO as a CPU runtime beside ONNX Runtime: compile an ONNX graph or an IR (.xml + .bin), run, time.

Every compile states its ``INFERENCE_PRECISION_HINT`` (OpenVINO's CPU plugin runs fp32 graphs in
bf16 by default on CPUs that have AVX-512 BF16 or AMX, so "fp32" must be asked for) and its
``INFERENCE_NUM_THREADS``; the precision the plugin then used is read back from the compiled
model and its execution graph, never assumed. bf16 is offered only where the CPU has it.

A Q/DQ (QuantizeLinear/DequantizeLinear) graph written by ``mimc quantize`` is read as FakeQuantize
ops, which OpenVINO's low-precision transformations turn into int8 kernels where both inputs of a
MatMul/Convolution are quantized.

Timing: like :mod:`mimc.runtime.ort` (worker ``python -m mimc.runtime.openvino``, :func:`runner`).

References:
- OpenVINO CPU device, precision hints and bf16: https://docs.openvino.ai/2026/openvino-workflow/running-inference/inference-devices-and-modes/cpu-device.html
- Low-precision transformations (FakeQuantize on both MatMul inputs):
  https://docs.openvino.ai/2026/documentation/openvino-extensibility/openvino-plugin-library/advanced-guides/low-precision-transformations.html
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mimc.atomic import atomic_file, write_error
from mimc.errors import BadInputError, DeviceUnavailableError, MissingExtraError, shorten
from mimc.runtime.timing import proc_field, time_runs, warmed, worker_main
from mimc.runtime.session import Port

INSTALL_HINT = "pip install 'mimc[openvino]'"
# mimc precision -> the float hint OpenVINO compiles with. int8 comes from the graph's Q/DQ ops; the
# layers left in float run in f32.
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8-bf16": "bf16"}
# the graph each precision compiles: int8-bf16 is the Q/DQ graph with its float layers (LayerNorm,
# softmax, GELU, the layers left unquantized) in bf16, where the CPU has it, as OpenVINO's default does
GRAPH_PRECISION = {"fp32": "fp32", "bf16": "fp32", "int8": "int8", "int8-bf16": "int8"}
IR_SUFFIXES = (".xml",)
_ORT_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "i64": "tensor(int64)",
              "i32": "tensor(int32)", "u8": "tensor(uint8)", "i8": "tensor(int8)", "boolean": "tensor(bool)"}
# Execution-graph layer types whose runtime precision says what the heavy math ran in.
COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution")


def openvino():
    """The installed ``openvino`` module, or a one-line install hint (exit 2)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError(f"OpenVINO is not installed: {INSTALL_HINT}") from exc
    return ov


_CORE = None


def core():
    global _CORE
    if _CORE is None:
        _CORE = openvino().Core()
    return _CORE


def _cpu_flags() -> set[str]:
    return set((proc_field("/proc/cpuinfo", "flags") or "").split())


def cpu_vnni() -> dict[str, Any]:
    """Whether this CPU multiplies u8 x s8 into int32 directly (AVX-512 VNNI, AVX-VNNI or AMX int8):
    without it, int8 kernels sum pairs of products in a saturating int16 (see the openvino target's
    overflow fix in :mod:`mimc.quant.qdq_graph`). From /proc/cpuinfo; no flags readable: assumed absent."""
    found = sorted(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {"supported": bool(found), "cpu_flags": found}


def cpu_bf16() -> dict[str, Any]:
    """Whether this CPU runs bf16 natively: cpuinfo flags and OpenVINO's optimization capabilities."""
    caps = [str(c) for c in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    found = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return {"supported": "BF16" in caps, "cpu_flags": found, "optimization_capabilities": caps}


def check_precision(precision: str) -> str:
    """The OpenVINO hint for ``precision``; bf16 and int8-bf16 refused where the CPU lacks bf16."""
    if precision not in HINTS:
        raise BadInputError(f"precision {precision} is not one that OpenVINO's CPU plugin runs: use one of {', '.join(HINTS)}", option="precision")
    if HINTS[precision] == "bf16":
        info = cpu_bf16()
        if not info["supported"]:
            raise DeviceUnavailableError(
                f"precision {precision} needs a CPU with AVX-512 BF16 or AMX; this one has neither (OpenVINO capabilities "
                f"{info['optimization_capabilities']}): use precision {'int8' if precision.startswith('int8') else 'fp32'}",
                option="precision")
    return HINTS[precision]


def read(path: str | Path):
    """An ``openvino.Model`` from an ONNX graph or an IR .xml (its .bin beside it)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"graph {path} does not exist: export one with `mimc export MODEL` or build an IR with `mimc build`")
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise BadInputError(f"{path} cannot be read ({exc.strerror}): check its permissions") from exc
    if path.suffix in IR_SUFFIXES and not re.search(rb"<net[\s>]", head):
        # else OpenVINO tries its other readers on it, TensorFlow's writing its own errors to stderr
        raise BadInputError(f"{path} is not an OpenVINO IR (no <net> element): build one with `mimc build GRAPH --device openvino-cpu`")
    if path.suffix in IR_SUFFIXES and not path.with_suffix(".bin").is_file():
        raise BadInputError(f"IR {path} has no weights file {path.with_suffix('.bin').name} beside it: rebuild it with `mimc build`")
    try:
        return core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line text, led by lines naming its sources
        said = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("Exception from ", "Check '"))]
        fix = "rebuild it with `mimc build`" if path.suffix in IR_SUFFIXES else "re-export it with `mimc export`"
        raise BadInputError(f"OpenVINO cannot read {path} ({(said or [type(exc).__name__])[0][:300]}): {fix}") from exc


def compile_model(path_or_model, precision: str = "fp32", threads: int | None = None, shapes: dict[str, list[int]] | None = None):
    """A CPU ``CompiledModel`` with an explicit precision hint and thread count; ``shapes`` fixes input shapes."""
    model = read(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    if shapes:
        model.reshape({name: list(shape) for name, shape in shapes.items()})
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": check_precision(precision), "PERFORMANCE_HINT": "LATENCY",
                              "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core().compile_model(model, "CPU", config)


def runtime_precision(compiled) -> dict[str, Any]:
    """What the plugin says it used: the compiled hint, and the execution graph's compute-layer precisions."""
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    layers: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()  # values are OVAny: str() gives the class name, astype(str) the value
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE_LAYERS and "runtimePrecision" in info:
            layers[info["runtimePrecision"].astype(str)] += 1
    return {"inference_precision_hint": _type_name(hint), "compute_layers": dict(sorted(layers.items()))}


def _type_name(text: str) -> str:
    """``<Type: 'float32'>`` / ``f32`` -> ``f32``."""
    names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    return next((short for long, short in names.items() if long in text), text)


# where an IR keeps the precision it was built at (fp32, bf16, int8, int8-bf16): int8 and fp32 share the f32 hint
MIMC_PRECISION_KEY = ["mimc", "precision"]
HINT_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]  # the float hint an IR is compiled with


def ir_precision(path: str | Path) -> str:
    """The precision an IR's build recorded (``mimc``/``precision``, else read from its
    ``runtime_options``/``INFERENCE_PRECISION_HINT``), else fp32."""
    model = read(path)
    if model.has_rt_info(MIMC_PRECISION_KEY) and (named := model.get_rt_info(MIMC_PRECISION_KEY).astype(str)) in HINTS:
        return named
    hint = model.get_rt_info(HINT_KEY).astype(str) if model.has_rt_info(HINT_KEY) else "f32"
    return "bf16" if hint == "bf16" else "fp32"


def _port(p) -> Port:
    """An OpenVINO input as ORT reports one: name, ORT's type string, dims (None for dynamic axes)."""
    return Port(p.get_any_name(), _ORT_TYPES.get(p.get_element_type().get_type_name(), "tensor(float)"),
                [d.get_length() if d.is_static else None for d in p.get_partial_shape()])


def model_inputs(path: str | Path) -> list[dict[str, Any]]:
    """The graph's inputs as ``{name, dtype (ORT's type string), shape (None for dynamic axes)}``."""
    return [{"name": p.name, "dtype": p.type, "shape": p.shape} for p in map(_port, read(path).inputs)]


class OpenVinoSession:
    """A compiled model behind ONNX Runtime's session surface (get_inputs/get_outputs/run), so code
    that runs an ORT session (:func:`mimc.runtime.session.run_onnx`) runs an IR unchanged."""

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        self.compiled = compile_model(path, precision, threads)
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[Port]:
        return [_port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[Port]:
        return [Port(p.get_any_name(), "tensor(float)", []) for p in self.compiled.outputs]

    def run(self, names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        by_name = {p.get_any_name(): np.array(result[p]) for p in self.compiled.outputs}
        return [by_name[n] for n in (names or list(by_name))]


def measure(path: str, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int,
            precision: str = "fp32") -> dict[str, Any]:
    """One batch size, in this process: compile (shapes fixed to ``specs``), warm-up, timed runs, memory."""
    shapes = {s["name"]: s["shape"] for s in specs}
    compiled, result = time_runs(lambda: compile_model(path, precision, threads, shapes=shapes),
                                 lambda compiled: compiled.create_infer_request().infer, specs, warmup, iters)
    return {**result, "runtime_precision": runtime_precision(compiled)}


def runner(path: str | Path, precision: str = "fp32", threads: int | None = None, warmup: int = 3):
    """One inference of ``path`` compiled at ``precision``, warmed, as a call (for
    :func:`mimc.runtime.timing.interleave`, which times it beside ORT sessions)."""
    compiled = compile_model(path, precision, threads)
    return warmed(compiled.create_infer_request().infer, map(_port, compiled.inputs), warmup)


def save_ir(model, out: str | Path) -> None:
    """Write ``out`` (.xml) and its .bin with the weights as they are (no fp16 compression), each
    renamed into place whole: what was there (a link to the graph, say) is replaced, never written through."""
    out = Path(out)
    # the nodes OpenVINO names itself (Constant_39) are numbered by a count kept across the process: renumbered
    # within the graph, the same graph writes the same IR however many were built before it
    for i, op in enumerate(model.get_ordered_ops()):
        if re.fullmatch(rf"{op.get_type_name()}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")
    with atomic_file(out) as xml, atomic_file(out.with_suffix(".bin")) as weights, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent) as tmp:
        try:
            openvino().save_model(model, f"{tmp}/ir.xml", compress_to_fp16=False)
        except RuntimeError as exc:  # its C++ stream's failure, without an errno: a full (or read-only) disk
            raise write_error(out, f"OpenVINO: {shorten(exc)}") from None
        os.replace(f"{tmp}/ir.xml", xml)
        os.replace(f"{tmp}/ir.bin", weights)


def version() -> str:
    return openvino().__version__


__all__ = ["openvino", "core", "cpu_bf16", "cpu_vnni", "check_precision", "read", "compile_model", "runtime_precision",
           "model_inputs", "ir_precision", "MIMC_PRECISION_KEY", "HINT_KEY", "OpenVinoSession", "measure",
           "runner", "save_ir", "version", "HINTS", "GRAPH_PRECISION", "IR_SUFFIXES", "INSTALL_HINT"]


if __name__ == "__main__":
    raise SystemExit(worker_main(measure, sys.argv[1:]))
