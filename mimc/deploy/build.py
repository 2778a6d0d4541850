"""One build for every deployable: an ONNX graph -> a TensorRT engine or, for an openvino-cpu
device, an OpenVINO IR; each with its JSON sidecar.

``mimc build`` and a recipe's ``build`` stage both come here, so the checks, the default precision
(the graph's own: :func:`mimc.latency.openvino_cpu.precision_for`) and the output names are the
same wherever a deployable is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mimc.atomic import check_writable
from mimc.errors import BadInputError


def build(model: str | Path, profile, *, precision: str | None = None, batch_range=None, workspace_gb: float | None = None,
          timing_cache=None, sparse: bool | None = None, output: str | Path | None = None,
          on_message: Callable[[str], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Build ``model`` (an ``.onnx`` graph) for ``profile`` (a :class:`~mimc.latency.devices.DeviceProfile`).

    Returns ``{"ir": path, "sidecar": {...}}`` (openvino-cpu) or ``{"engine": path, "sidecar": {...}}``
    (TensorRT). ``output`` None: ``<profile>-<precision>.xml`` / ``.plan`` beside the graph; an existing
    file outside an artifact is replaced only with ``overwrite`` (an artifact's own is rebuilt). Every check
    that needs no GPU runs before TensorRT is imported, so bad input is refused here as on the target.
    """
    from mimc.artifact import verify_graph
    from mimc.deploy.tensorrt import build_engine, parse_batch_range

    if isinstance(batch_range, str):
        batch_range = parse_batch_range(batch_range)  # "1:4:8"
    model = Path(model)
    if model.suffix != ".onnx":
        raise BadInputError(f"{model} is not an .onnx graph: pass the graph `mimc export` wrote (model.onnx)")
    if model.is_file():
        verify_graph(model)  # a graph its artifact lists (and its external data) must be the one recorded
    if profile.backend == "openvino-cpu":  # an OpenVINO IR, not an engine
        given = tuple(name for name, value in (("batch", batch_range), ("workspace_gb", workspace_gb),
                                               ("timing_cache", timing_cache), ("sparse", sparse)) if value is not None)
        if given:
            raise BadInputError(f"{', '.join(given)} set TensorRT's builder; an OpenVINO IR has no such setting: drop "
                                f"{'them' if len(given) > 1 else 'it'}", option=given)
        from mimc.deploy.openvino import build_ir
        from mimc.latency.openvino_cpu import precision_for

        precision = precision_for(model, precision)  # the graph's own by default; one it does not run is refused
        out = Path(output) if output is not None else model.parent / f"{profile.name}-{precision}.xml"
        _check_outputs(model, out, overwrite)
        return {"ir": str(out), "sidecar": build_ir(model, profile, out, precision=precision)}
    from mimc.graph import graph_precision

    # named for the engine's precision: the one asked, else the graph's own (build_engine refuses what it cannot build)
    name = f"{profile.name}-{precision or graph_precision(model)}.plan"
    out = Path(output) if output is not None else model.parent / name
    _check_outputs(model, out, overwrite)
    side = build_engine(model, profile, out, batch_range=batch_range, workspace_gb=4.0 if workspace_gb is None else workspace_gb,
                        timing_cache=timing_cache, sparse=sparse, precision=precision, on_message=on_message)
    return {"engine": str(out), "sidecar": side}


def _check_outputs(model: Path, out: Path, overwrite: bool) -> None:
    """The deployable's files (it, an IR's .bin, the sidecar): none a folder (refused before any is written),
    none in an artifact the graph does not come from, none the graph or its external weights (a link in their
    place is replaced, not written through), an existing file outside an artifact only with ``overwrite``, and
    a folder this user can write."""
    from mimc.artifact import is_artifact
    from mimc.atomic import check_new_files, check_not_input
    from mimc.graph import external_file, load_graph, uses_external

    files = (out, Path(f"{out}.json"), *([out.with_suffix(".bin")] if out.suffix == ".xml" else []))
    for folder in (f for f in files if f.is_dir()):
        raise BadInputError(f"output {folder} is a directory: give a file path", option="output")
    in_artifact = is_artifact(out.parent)
    if in_artifact and out.parent.resolve() != model.parent.resolve():  # its mimc.json would not list it: every command refuses it
        raise BadInputError(f"output {out} is inside the artifact {out.parent}, which {model} does not come from: "
                            f"write it outside that artifact, or build the artifact's own graph", option="output")
    if not model.is_file():
        return  # refused by the build, naming the graph
    inputs = [model, *(external_file(t, model.parent) for t in load_graph(model, external_data=False).graph.initializer
                       if uses_external(t))]
    for written in files:
        if not written.is_symlink():
            check_not_input(written, inputs, inside=False)
    if not in_artifact and out.parent.is_dir():  # an artifact's own IR or engine is rebuilt in place
        check_new_files([out], overwrite)
    check_writable(out)  # a folder this user cannot write: refused before the build, not after


__all__ = ["build"]
