"""An ONNX graph (or an OpenVINO IR ``.xml`` built from one) written by mimc, run like an encoder:
pixels in, (pooled, tokens) torch tensors out. An IR runs on OpenVINO's CPU plugin at the precision
its build recorded; an ONNX graph on ONNX Runtime CPU.

Its artifact directory's ``mimc.json`` gives the input spec (so the caller can load matching images)
and the sha256 of the graph and of its external data, checked before it runs; a static batch is
served by chunking and padding the last chunk. ONNX Runtime loads the graph from its path, so
weights kept beside it in external data (graphs past 2 GiB) are read from there.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mimc.errors import NotAModelError
from mimc.runtime.session import make_session, run_onnx


class OnnxModel:
    """An ONNX graph written by mimc, run on ONNX Runtime CPU; ``config`` comes from its artifact."""

    def __init__(self, path: str | os.PathLike):
        from mimc.artifact import is_artifact, read_manifest, verify_graph
        from mimc.models.vit import EncoderConfig

        self.path = Path(path)
        if not self.path.is_file():
            raise NotAModelError(f"graph {self.path} does not exist: export one with `mimc export MODEL`")
        if not is_artifact(self.path.parent):
            raise NotAModelError(
                f"{self.path} was not written by mimc (no mimc.json beside it, so its input spec is unknown): "
                "export it with `mimc export MODEL` or evaluate the source model"
            )
        self.manifest = read_manifest(self.path.parent)
        verify_graph(self.path)  # as its mimc.json recorded it (graph and external data): else refused
        self.config = EncoderConfig.from_dict(self.manifest.encoder)
        self._session = None

    def session(self):
        if self._session is None:
            if self.path.suffix == ".xml":
                from mimc.runtime.openvino import OpenVinoSession, ir_precision

                self._session = OpenVinoSession(self.path, ir_precision(self.path))
            else:
                # mimc's session options: no spinning threads stealing cores from the torch reference.
                self._session = make_session(self.path)
        return self._session

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        sess = self.session()
        inp = sess.get_inputs()[0]
        np_dtype = np.float16 if "float16" in inp.type else np.float32
        static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        chunks = [x] if static_batch is None else list(x.split(static_batch))
        pooled, tokens = [], []
        for chunk in chunks:
            n = chunk.shape[0]
            if static_batch is not None and n < static_batch:  # pad a short last batch, trim after
                chunk = torch.cat([chunk, chunk[-1:].expand(static_batch - n, *chunk.shape[1:])])
            p, t = self._split_outputs(run_onnx(sess, chunk.numpy().astype(np_dtype)))
            pooled.append(p[:n])
            if t is not None:
                tokens.append(t[:n])
        return torch.cat(pooled), (torch.cat(tokens) if tokens else None)

    def _split_outputs(self, outs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pooled`` and ``last_hidden_state`` by name (mimc's export), else by rank."""
        values = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in outs.items()}
        pooled = values.get("pooled")
        tokens = values.get("last_hidden_state")
        if pooled is None:
            pooled = next((v for v in values.values() if v.dim() == 2), None)
        if tokens is None:
            tokens = next((v for v in values.values() if v.dim() == 3), None)
        if pooled is None:
            raise NotAModelError(f"{self.path} has no pooled (batch, dim) output: re-export it with `mimc export`")
        return pooled, tokens


__all__ = ["OnnxModel"]
