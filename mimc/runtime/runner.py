"""A model on its runtime, for the verbs that run one over images (embed, eval).

The model is a torch :class:`~mimc.models.vit.Encoder` (any MODEL argument) or a graph file - a mimc
``.onnx`` (ONNX Runtime, CPU or CUDA), an OpenVINO IR ``.xml`` or a TensorRT ``.engine`` / ``.plan``
(through :class:`~mimc.runtime.onnx_model.OnnxModel`). The session is created when the runner is
opened, so a graph its runtime cannot load, or a missing GPU, is refused before any image is read.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, NotAModelError
from mimc.runtime.timing import check_threads

Forward = Callable[[torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class Runner:
    """``forward(pixels, tokens)`` -> (pooled (B, D), tokens (B, T, D) or None) as float32 CPU tensors;
    without ``tokens`` a graph need not have a token output."""

    forward: Forward
    config: Any
    runtime: str  # torch, onnxruntime-cpu, onnxruntime-cuda, openvino-cpu, tensorrt
    device: str
    threads: int | None = None
    static_batch: int | None = None
    name: str = "the model"

    def run(self, x: torch.Tensor, tokens: bool) -> np.ndarray:
        """Pooled features (B, D), or with ``tokens`` every output token (B, T, D), as numpy."""
        pooled, toks = self.forward(x, tokens)
        if tokens and toks is None:
            raise BadInputError(f"{self.name} has no token output: export it with `mimc export` or embed pooled features",
                                option="tokens")
        return (toks if tokens else pooled).numpy()

    @contextlib.contextmanager
    def threads_set(self):
        """torch's intra-op threads for the run (restored after); the graph runtimes set theirs per session."""
        if self.runtime != "torch" or not self.threads:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def graph_kind(model: Any) -> str | None:
    """onnx, openvino or tensorrt for a graph file's path; None for anything else."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    suffix = Path(model).suffix.lower()
    return {".onnx": "onnx", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt"}.get(suffix)


def check_device(model: Any, device: str | None, threads: int | None) -> str:
    """The device a model runs on (``device`` None: its runtime's own), refusing what cannot be."""
    kind = graph_kind(model)
    check_threads(threads)
    if device is not None and device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device} is not cpu or cuda: choose one of them", option="device")
    if kind == "tensorrt":
        if device == "cpu":
            raise ConfigError("device cpu cannot run a TensorRT engine (it runs on the GPU that built it): "
                              "drop device, or use the engine's .onnx graph on the CPU", option="device")
        if threads is not None:
            raise ConfigError("threads sets CPU inference threads; a TensorRT engine runs on the GPU: drop threads", option="threads")
        return "cuda"
    if kind == "openvino" and device == "cuda":
        raise ConfigError("device cuda: an OpenVINO IR runs on mimc's OpenVINO CPU runtime: drop device, "
                          "or use the .onnx graph with device cuda (ONNX Runtime's CUDA provider)", option="device")
    return device or "cpu"


def open_runner(model: Any, device: str | None = None, threads: int | None = None) -> Runner:
    """A MODEL argument, an Encoder, or a graph file (``.onnx``, ``.xml``, ``.engine`` / ``.plan``) on its runtime."""
    from mimc.runtime.onnx_model import OnnxModel

    # an Encoder given without a device runs where the caller keeps it
    own = next(model.parameters()).device if device is None and isinstance(model, torch.nn.Module) else None
    device = check_device(model, device if own is None else own.type, threads)
    if graph_kind(model) is not None:
        graph = OnnxModel(model, threads=threads, device=device)
        try:
            sess = graph.session()
        except DeviceUnavailableError as exc:
            raise DeviceUnavailableError(str(exc), option="device") from None
        shape = sess.get_inputs()[0].shape
        static = shape[0] if shape and isinstance(shape[0], int) else None
        return Runner(lambda x, tokens: graph(x, tokens=tokens), graph.config, graph.runtime, device, threads, static,
                      str(model))

    is_path = isinstance(model, (str, os.PathLike))
    if is_path:
        from mimc.models.resolve import load_model

        encoder = load_model(str(model))
    elif isinstance(model, torch.nn.Module):
        encoder = model
    else:
        raise NotAModelError(f"cannot run a {type(model).__name__}: pass an Encoder, a MODEL argument or a graph file")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device cuda: no CUDA GPU is visible to torch here (torch.cuda.is_available() is False): "
                                     "use device cpu", option="device")
    # The canonical encoder has no dropout or batch norm: train and eval mode compute the same, and
    # the caller's module is not changed (a copy goes to the GPU when asked for).
    target = own or torch.device(device)

    @torch.no_grad()
    def forward(x: torch.Tensor, tokens: bool):
        out = encoder(x.to(target))
        return out.pooled.float().cpu(), out.last_hidden_state.float().cpu() if tokens else None

    if device == "cuda" and own is None:
        encoder = encoder.to(target) if is_path else copy.deepcopy(encoder).to(target)
    return Runner(forward, encoder.config, "torch", device, threads, None, str(model) if is_path else "the model")


__all__ = ["Runner", "open_runner", "check_device", "graph_kind"]
