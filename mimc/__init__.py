"""mimc: compress masked-image-modeling encoders into small, fast, validated deployables.

The public verbs (each CLI command is a thin shell around one):
``load``, ``save``, ``compress``, ``export_onnx``, ``quantize``, ``build_engine``, ``profile``,
``run_recipe``;
evaluation is ``mimc.evaluate.evaluate`` (a module of that name would shadow a verb).
Imports are lazy so ``import mimc`` stays cheap.
"""
from __future__ import annotations

from mimc._version import __version__



def compress(encoder, config, calibration_batches=None):
    """Apply one stage config: ``(encoder, StageRecord)``; the input encoder is left untouched."""
    from mimc.compression.registry import compress as _compress

    return _compress(encoder, config, calibration_batches)


def load(model):
    """Any MODEL argument (``ref``, artifact dir, HF dir, checkpoint file, hub id) -> Encoder."""
    from mimc.models.resolve import load_model

    return load_model(model)


def save(encoder, out_dir, overwrite: bool = False):
    """Write an artifact directory (model.safetensors + mimc.json), atomically."""
    from mimc.artifact import save_artifact

    return save_artifact(encoder, out_dir, overwrite=overwrite)


def export_onnx(encoder, path, **options):
    """Export to ONNX and validate on ONNX Runtime; see :mod:`mimc.deploy.onnx`."""
    from mimc.deploy.onnx import export_onnx as _export

    return _export(encoder, path, **options)


def quantize(onnx_in, onnx_out, calibration_batches, config, eval_batches=None):
    """Graph-level int8/fp8 Q/DQ of an fp32 mimc graph; see :func:`mimc.quant.quantize.quantize_onnx`."""
    from mimc.quant.quantize import quantize_onnx

    return quantize_onnx(onnx_in, onnx_out, calibration_batches, config, eval_batches)


def build_engine(onnx_path, profile, out_path, **options):
    """TensorRT engine + JSON sidecar (needs a GPU and ``mimc[gpu]``); see :mod:`mimc.deploy.tensorrt`."""
    from mimc.deploy.tensorrt import build_engine as _build

    return _build(onnx_path, profile, out_path, **options)


def profile(model_path, **options):
    """Latency report for an ONNX graph or engine; see :mod:`mimc.latency`."""
    from mimc.latency.run import profile as _profile

    return _profile(model_path, **options)


def run_recipe(recipe, output=None, **options):
    """Run a recipe (a YAML path, an artifact directory to replay, a mapping, or a Recipe) into one
    artifact; returns the run report. See :mod:`mimc.pipeline.recipe` and :mod:`mimc.pipeline.recipe_run`."""
    from mimc.pipeline.recipe import Recipe, load_recipe, parse_recipe
    from mimc.pipeline.recipe_run import run_recipe as _run

    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    return _run(recipe, output, **options)


__all__ = ["__version__", "load", "save", "compress", "export_onnx", "quantize", "build_engine", "profile", "run_recipe"]
