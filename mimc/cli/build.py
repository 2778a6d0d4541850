"""``mimc build MODEL.onnx --device h100``: a TensorRT engine and its JSON sidecar."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc.cli.common import JsonOption, console, echo_tensorrt, emit_json, handle_errors


def print_build(side: dict[str, Any], engine: Path) -> None:
    from rich.table import Table

    table = Table(title=f"built {engine}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("GPU / TensorRT", f"{side['gpu_name']} (cc {side['compute_capability']}) / {side['tensorrt_version']}")
    table.add_row("precision (from the graph)", side["precision"])
    table.add_row("batch min:opt:max", ":".join(map(str, side["batch_range"])))
    sparse = side["sparse"]
    if sparse["requested"]:
        # The log names the layers; when only the engine inspector saw sparse tactics, count those.
        n_sparse = len(sparse["picked_layers"]) or len(sparse.get("inspector_sparse_layers") or [])
        picked = {True: f"[green]yes[/] ({n_sparse} layers)", False: "[yellow]no[/] (dense kernels were faster)",
                  None: "unknown (TensorRT did not say)"}[sparse["picked"]]
        table.add_row("sparse kernels picked", picked)
    else:
        table.add_row("sparse weights", "off")
    table.add_row("engine", f"{side['engine_bytes'] / 1e6:.1f} MB, built in {side['build_seconds']:.1f} s")
    console.print(table)
    for note in side.get("notes", []):
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    @app.command("build")
    @handle_errors
    def build(
        model: Path = typer.Argument(..., help="An ONNX graph (model.onnx, model.int8.onnx, ...): its precision is what the engine runs."),
        device: str = typer.Option(..., "--device", "-d", help="A TensorRT device profile (see `mimc profiles`) or a profile .yaml."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp16 casts an fp32 graph first; int8/fp8 need a quantized graph (default: the graph's)."),
        batch: Optional[str] = typer.Option(None, "--batch", "-b", help="MIN:OPT:MAX batch range of the optimization profile (default 1:1:<largest profile batch>)."),
        workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="Builder workspace limit in GB."),
        timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, read if present and updated after the build."),
        sparse: Optional[bool] = typer.Option(None, "--sparse/--no-sparse", help="Sparse weights (default: on when the model is 2:4 and the device has sparse tensor cores)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Engine path (default: <device>-<precision>.plan beside the graph)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Build a TensorRT engine (strongly typed: precision comes from the graph) plus a JSON sidecar."""
        from mimc.errors import BadInputError
        from mimc.deploy.tensorrt import build_engine, builder_settings, parse_batch_range
        from mimc.latency.devices import load_profile
        from mimc.graph import graph_precision, input_dims, load_graph, read_nm_pattern

        profile = load_profile(device)
        batch_range = parse_batch_range(batch)
        if model.suffix != ".onnx":
            raise BadInputError(f"{model} is not an .onnx graph: pass the graph `mimc export` wrote (model.onnx)")
        graph = load_graph(model)
        # Every check that needs no GPU runs first, so bad input exits 2 here as on the target.
        settings = builder_settings(profile, graph_precision(graph), input_dims(graph), precision=precision,
                                    batch_range=batch_range, workspace_gb=workspace_gb, sparse=sparse,
                                    nm_pattern=read_nm_pattern(model, graph))
        del graph
        out = output or model.parent / f"{profile.name}-{settings['precision']}.plan"
        with console.status(f"building a TensorRT engine for {profile.name} (minutes for a ViT-B)"):
            side = build_engine(model, profile, out, batch_range=batch_range, workspace_gb=workspace_gb,
                                timing_cache=timing_cache, sparse=sparse, precision=precision, on_message=echo_tensorrt)
        if json_out:
            emit_json({"engine": str(out), "sidecar": side})
        else:
            print_build(side, out)
