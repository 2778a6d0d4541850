"""Build an OpenVINO IR (.xml + .bin) from an ONNX graph for an openvino-cpu device, with a JSON sidecar.

The IR keeps the graph's weights as they are (``compress_to_fp16=False``: OpenVINO's default would
halve fp32 weights to fp16) and records the float precision it is meant to run in its
``runtime_options`` (``INFERENCE_PRECISION_HINT``), which :mod:`mimc.runtime.openvino` reads back.
The build compiles the IR once on this CPU, so an IR that does not compile is never written, and
the sidecar says which precision the plugin used.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mimc.artifact import mimc_version, now_iso
from mimc.atomic import write_json
from mimc.errors import BadInputError


def build_ir(onnx_path: str | Path, profile, out_path: str | Path, precision: str = "fp32") -> dict[str, Any]:
    """Write ``out_path`` (.xml, its .bin beside it) and ``out_path.json``; returns the sidecar."""
    from mimc.runtime.openvino import (HINT_KEY, MIMC_PRECISION_KEY, check_precision, compile_model, model_inputs, read,
                                       runtime_precision, save_ir, version)

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if out_path.suffix != ".xml":
        raise BadInputError(f"output {out_path} must end in .xml (an OpenVINO IR; its .bin is written beside it)", option="output")
    from mimc.latency.openvino_cpu import precision_for

    precision_for(onnx_path, precision)  # an IR's recorded precision must be what it runs
    hint = check_precision(precision)  # an unknown precision, or bf16 on a CPU without it: one line
    start = time.perf_counter()
    model = read(onnx_path)
    model.set_rt_info(hint, HINT_KEY)
    model.set_rt_info(precision, MIMC_PRECISION_KEY)  # int8 and fp32 share the f32 hint: the name says which
    compiled = compile_model(model, precision, profile.threads_here())  # refuse before writing anything
    used = runtime_precision(compiled)
    save_ir(model, out_path)
    sidecar = {
        "format": "openvino-ir",
        "source": str(onnx_path.resolve()),  # absolute: an IR written elsewhere finds its artifact from any folder
        "device": profile.name,
        "backend": profile.backend,
        "precision": precision,
        "runtime_precision": used,
        "openvino_version": version(),
        "mimc_version": mimc_version(),
        "inputs": {i["name"]: {"dtype": i["dtype"], "shape": i["shape"]} for i in model_inputs(out_path)},
        "ir_bytes": out_path.stat().st_size + out_path.with_suffix(".bin").stat().st_size,
        "build_seconds": round(time.perf_counter() - start, 3),
        "created": now_iso(),
    }
    write_json(Path(f"{out_path}.json"), sidecar)
    return sidecar


__all__ = ["build_ir"]
