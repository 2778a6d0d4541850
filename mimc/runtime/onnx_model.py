"""A graph written by mimc, run like an encoder: pixels in, (pooled, tokens) torch tensors out.

An ONNX graph runs on ONNX Runtime (CPU, or its CUDA provider with ``device="cuda"``), an OpenVINO
IR (``.xml``) on OpenVINO's CPU plugin at the precision its build recorded, a TensorRT engine
(``.engine`` / ``.plan``) on the GPU through :class:`~mimc.runtime.trt.EngineSession`. ``threads``
sets the CPU inference threads of ONNX Runtime and OpenVINO.

Its artifact directory's ``mimc.json`` gives the input spec (so the caller can load matching images)
and the sha256 of the graph and of its external data, checked before it runs; for an engine written
outside its artifact, the sidecar's graph path leads there. A static batch is served by chunking and
padding the last chunk (an engine's batch range likewise). ONNX Runtime loads the graph from its
path, so weights kept beside it in external data (graphs past 2 GiB) are read from there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mimc.artifact import is_artifact, read_manifest, verify_graph
from mimc.errors import NotAModelError
from mimc.models.vit import EncoderConfig
from mimc.runtime.session import make_session, run_onnx
from mimc.runtime.trt import ENGINE_SUFFIXES, sidecar_path


class OnnxModel:
    """A graph written by mimc on its runtime; ``config`` comes from its artifact."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, device: str = "cpu"):
        self.path = Path(path)
        self.threads, self.device = threads, device  # checked by mimc.runtime.runner.check_device
        if not self.path.is_file():
            raise NotAModelError(f"graph {self.path} does not exist: export one with `mimc export MODEL`")
        self.manifest = read_manifest(self._artifact())
        verify_graph(self.path)  # as its mimc.json recorded it (graph and external data): else refused
        self.config = EncoderConfig.from_dict(self.manifest.encoder)
        suffix = self.path.suffix  # what runs it
        self.runtime = ("openvino-cpu" if suffix == ".xml" else "tensorrt" if suffix in ENGINE_SUFFIXES
                        else f"onnxruntime-{device}")
        self._session = None

    def _artifact(self) -> Path:
        folder = self.path.parent
        if not is_artifact(folder) and self.path.suffix in (*ENGINE_SUFFIXES, ".xml"):
            try:  # an engine or IR built with -o elsewhere: its sidecar names the graph it was built from
                sidecar = json.loads(sidecar_path(self.path).read_text())
                graph = sidecar.get("onnx") or sidecar.get("source")  # TensorRT's key, OpenVINO's
                folder = Path(graph).parent if graph else folder
            except (OSError, ValueError, AttributeError):
                pass
        if not is_artifact(folder):
            raise NotAModelError(
                f"{self.path} was not written by mimc (no mimc.json beside it, so its input spec is unknown): "
                "export it with `mimc export MODEL` or use the source model"
            )
        return folder

    def session(self):
        if self._session is None:
            if self.runtime == "openvino-cpu":
                from mimc.runtime.openvino import OpenVinoSession, ir_precision

                self._session = OpenVinoSession(self.path, ir_precision(self.path), self.threads)
            elif self.runtime == "tensorrt":
                from mimc.runtime.trt import EngineSession

                self._session = EngineSession(self.path)
            elif self.runtime == "onnxruntime-cuda":
                from mimc.runtime.cuda_ort import cuda_session

                self._session = cuda_session(self.path, torch.cuda.current_device() if torch.cuda.is_available() else 0,
                                             threads=self.threads)
            else:
                # mimc's session options: no spinning threads stealing cores from the torch reference.
                self._session = make_session(self.path, threads=self.threads)
        return self._session

    def __call__(self, x: torch.Tensor, tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features and (unless ``tokens`` is False) every output token, as float32 tensors."""
        sess = self.session()
        inp = sess.get_inputs()[0]
        np_dtype = np.float16 if "float16" in inp.type else np.float32
        lo, hi = getattr(sess, "batch_range", (None, None))  # a TensorRT engine's profile
        static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        step = static_batch or hi
        chunks = [x] if step is None else list(x.split(step))
        pad_to = static_batch or lo or 0
        # only ``pooled`` when tokens are not wanted and mimc's output names are there (else every output)
        names = ["pooled"] if not tokens and "pooled" in [o.name for o in sess.get_outputs()] else None
        pooled, token_out = [], []
        for chunk in chunks:
            n = chunk.shape[0]
            if n < pad_to:  # pad a short last batch, trim after
                chunk = torch.cat([chunk, chunk[-1:].expand(pad_to - n, *chunk.shape[1:])])
            feed = chunk.numpy().astype(np_dtype, copy=False)
            outs = dict(zip(names, sess.run(names, {inp.name: feed}))) if names else run_onnx(sess, feed)
            p, t = self._split_outputs(outs)
            pooled.append(p[:n])
            if t is not None and tokens:
                token_out.append(t[:n])
        return torch.cat(pooled), (torch.cat(token_out) if token_out else None)

    def _split_outputs(self, outs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pooled`` and ``last_hidden_state`` by name (mimc's export), else by rank."""
        values = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in outs.items()}
        pooled = values.get("pooled", next((v for v in values.values() if v.dim() == 2), None))
        tokens = values.get("last_hidden_state", next((v for v in values.values() if v.dim() == 3), None))
        if pooled is None:
            raise NotAModelError(f"{self.path} has no pooled (batch, dim) output: re-export it with `mimc export`")
        return pooled, tokens


__all__ = ["OnnxModel", "ENGINE_SUFFIXES"]
