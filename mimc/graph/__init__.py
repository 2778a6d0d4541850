"""ONNX graph utilities: graph files (:mod:`mimc.graph.files`) and what a graph says (:mod:`mimc.graph.info`).

Everything here reads and writes graph files; nothing runs them (that is :mod:`mimc.runtime`).
"""
from mimc.graph import files, info
from mimc.graph.files import *  # noqa: F401,F403
from mimc.graph.info import *  # noqa: F401,F403

__all__ = files.__all__ + info.__all__
