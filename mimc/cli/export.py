"""``mimc export MODEL``: write ``model.onnx`` beside the weights, validated on ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, ModelArgument, handle_errors, status
from mimc.cli.render import key_values, show


def register(app: typer.Typer) -> None:
    @app.command("export")
    @handle_errors
    def export(
        model: str = ModelArgument,
        output: Optional[Path] = typer.Option(
            None, "-o", "--output",
            help="Artifact directory to write model.onnx into (default: MODEL itself when it is an artifact, else ./<model>-mimc).",
        ),
        batch: str = typer.Option("1", "--batch", help="Static batch size, or 'dynamic' for a dynamic batch axis."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17: LayerNormalization stays one node)."),
        exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default) or dynamo."),
        force: bool = typer.Option(False, "--force", help="Keep a graph that fails the fidelity gate (recorded as failed)."),
        validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare the graph with torch on ONNX Runtime."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory; in an artifact, a model.onnx other graphs were made from (removing them)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the deterministic validation inputs."),
        json_out: bool = JsonOption,
    ) -> None:
        """Export to ONNX (input pixel_values; outputs last_hidden_state, pooled) and validate it."""
        with status(f"exporting and validating {model}"):
            report = api.export(model, output, batch=batch, opset=opset, exporter=exporter, validate=validate,
                                 force=force, seed=seed, overwrite=overwrite)
        show(report, json_out, _human)


def _human(r: dict) -> None:
    rows = [("opset / batch", f"{r['opset']} / {r['batch']}"), ("size", f"{r['bytes'] / 1e6:.2f} MB"),
            ("exporter", f"{r['exporter']} (torch {r['torch_version']})")]
    v = r.get("validation")
    if v is None:
        rows.append(("validation", "[yellow]skipped (--no-validate)[/]"))
    else:
        f = v["fidelity"]
        sqnr = min(x for x in (f["sqnr_db"], f["token_sqnr_db"]) if x is not None)
        top = "inf (non-finite outputs)" if f["max_abs"] is None else f"{f['max_abs']:.2e}"
        rows.append(("vs torch (ORT CPU)", f"max abs {top}, cosine {f['image_cosine_min']:.6f}, SQNR {sqnr:.1f} dB"))
        rows.append((f"{v['gate']['precision']} gate", "[green]pass[/]" if v["passed"] else "[red]FAILED, kept by --force[/]"))
    rows.append(("seconds", f"export {r['export_seconds']:.1f}" + (f", validate {v['seconds']:.1f}" if v else "")))
    key_values(f"exported {r['path']}", rows)
