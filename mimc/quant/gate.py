"""Judging a quantized graph: where it runs, its outputs on held-out inputs, and its fidelity to the fp32 graph.

A graph is judged as it will run: a TensorRT Q/DQ graph as its exact fp32 emulation on ONNX Runtime
(ORT's own int8 fusions are not TensorRT's), an OpenVINO graph through OpenVINO (its int8 kernels
round like ORT's, but the float layers between them are its own), a CPU graph on ONNX Runtime's
int8 kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimc.metrics import Fidelity, compare_outputs


def runnable_here(config) -> tuple[bool, str]:
    if config.precision == "fp8":
        return False, ("ONNX Runtime CPU has no FP8 matmul kernels; run it with TensorRT on Hopper/Ada. "
                       "Fidelity here is an fp32 emulation of the same Q/DQ graph (E4M3 rounding, float math).")
    return True, {"tensorrt": "runs on ONNX Runtime CPU as plain Q/DQ (emulated, slow); built for TensorRT",
                  "openvino": "OpenVINO CPU (Q/DQ read as FakeQuantize, int8 kernels); judged through OpenVINO",
                  "cpu": "ONNX Runtime CPU (MatMulIntegerToFloat / QAttention, VNNI)"}[config.resolved_target]


def graph_outputs(path: Path, inputs: list[np.ndarray], emulate_qdq: bool = False, runtime: str = "ort") -> dict[str, np.ndarray]:
    """Every output of the graph at ``path`` on ``inputs`` (chunked to its static batch; a remainder
    that does not fill a batch is left out), on ONNX Runtime or (``runtime`` openvino) an OpenVINO
    fp32-hint compiled model. The session, and the weights it read, are freed on return."""
    if runtime == "openvino":
        from mimc.runtime.openvino import OpenVinoSession

        sess = OpenVinoSession(path, "fp32")
    else:
        from mimc.runtime.session import make_session

        sess = make_session(path, emulate_qdq=emulate_qdq)
    name = sess.get_inputs()[0].name
    dims = sess.get_inputs()[0].shape
    batch = dims[0] if isinstance(dims[0], int) else None
    full = np.concatenate(inputs)
    step = batch or full.shape[0]
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, (full.shape[0] // step) * step, step):
        for o, v in zip([o.name for o in sess.get_outputs()], sess.run(None, {name: full[i : i + step]})):
            outs.setdefault(o, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def measure_fidelity(fp32_path: Path, quant_path: Path, eval_inputs: list[np.ndarray], config,
                     pooled_only: bool = False, reference: dict[str, np.ndarray] | None = None) -> tuple[Fidelity, list[str]]:
    """The quantized graph against the fp32 graph on held-out inputs; also the outputs compared.

    ``reference``: the fp32 graph's outputs on ``eval_inputs`` when already computed (then only the
    quantized graph is loaded). The two graphs are run one after the other, never held together.
    """
    ref = reference if reference is not None else graph_outputs(fp32_path, eval_inputs)
    cand = graph_outputs(quant_path, eval_inputs, emulate_qdq=config.resolved_target == "tensorrt",
                         runtime="openvino" if config.resolved_target == "openvino" else "ort")
    if pooled_only and "pooled" in ref:
        # Token merging picks its merges from token similarities: a perturbation as small as int8
        # noise can swap which tokens merge, reordering last_hidden_state while the pooled feature
        # (what downstream heads and k-NN use) barely moves. Judge the pooled output there.
        ref, cand = {"pooled": ref["pooled"]}, {"pooled": cand["pooled"]}
    return compare_outputs(ref, cand), sorted(ref)


__all__ = ["runnable_here", "graph_outputs", "measure_fidelity"]
