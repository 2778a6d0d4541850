"""``mimc build MODEL.onnx --device h100``: a TensorRT engine (or, for openvino-cpu, an OpenVINO IR) and its JSON sidecar."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, echo_tensorrt, handle_errors, status
from mimc.cli.render import key_values, note, show


def register(app: typer.Typer) -> None:
    @app.command("build")
    @handle_errors
    def build(
        model: Path = typer.Argument(..., help="An ONNX graph (model.onnx, model.int8.onnx, ...): its precision is what the engine runs."),
        device: str = typer.Option(..., "--device", "-d", help="A TensorRT device profile or openvino-cpu (see `mimc profiles`), or a profile .yaml."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp16 casts an fp32 graph first; int8/fp8 need a quantized graph (openvino-cpu: fp32/bf16 for fp32 graphs, int8/int8-bf16 for quantized ones; default: the graph's)."),
        batch: Optional[str] = typer.Option(None, "--batch", "-b", help="MIN:OPT:MAX batch range of the optimization profile (default 1:1:<largest profile batch>)."),
        workspace_gb: Optional[float] = typer.Option(None, "--workspace-gb", help="Builder workspace limit in GB (default 4)."),
        timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, read if present and updated after the build."),
        sparse: Optional[bool] = typer.Option(None, "--sparse/--no-sparse", help="Sparse weights (default: on when the model is 2:4 and the device has sparse tensor cores)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Engine or IR path (default: <device>-<precision>.plan, or .xml for openvino-cpu, beside the graph)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file outside an artifact."),
        json_out: bool = JsonOption,
    ) -> None:
        """Build a TensorRT engine (strongly typed: precision comes from the graph) or an OpenVINO IR, plus a JSON sidecar."""
        with status(f"building for {device} (a TensorRT engine takes minutes for a ViT-B)"):
            report = api.build(model, device, precision=precision, batch_range=batch,
                                workspace_gb=workspace_gb, timing_cache=timing_cache, sparse=sparse, output=output,
                               on_message=echo_tensorrt, overwrite=overwrite)
        show(report, json_out, _human)


def _human(r: dict) -> None:
    if "ir" in r:  # an OpenVINO IR
        s = r["sidecar"]
        key_values(f"built {r['ir']}", [("OpenVINO", s["openvino_version"]), ("precision", s["precision"]),
                                        ("runtime precision", str(s["runtime_precision"])),
                                        ("IR", f"{s['ir_bytes'] / 1e6:.1f} MB, built in {s['build_seconds']:.1f} s")])
        return
    side, sparse = r["sidecar"], r["sidecar"]["sparse"]
    rows = [("GPU / TensorRT", f"{side['gpu_name']} (cc {side['compute_capability']}) / {side['tensorrt_version']}"),
            ("precision (from the graph)", side["precision"]), ("batch min:opt:max", ":".join(map(str, side["batch_range"])))]
    if sparse["requested"]:
        # The log names the layers; when only the engine inspector saw sparse tactics, count those.
        n_sparse = len(sparse["picked_layers"]) or len(sparse.get("inspector_sparse_layers") or [])
        rows.append(("sparse kernels picked", {True: f"[green]yes[/] ({n_sparse} layers)", False: "[yellow]no[/] (dense kernels were faster)",
                                               None: "unknown (TensorRT did not say)"}[sparse["picked"]]))
    else:
        rows.append(("sparse weights", "off"))
    rows.append(("engine", f"{side['engine_bytes'] / 1e6:.1f} MB, built in {side['build_seconds']:.1f} s"))
    key_values(f"built {r['engine']}", rows)
    for text in side.get("notes", []):
        note(f"[dim]{text}[/]")
