"""``mimc export MODEL``: write ``model.onnx`` beside the weights, validated on ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, console, emit_json, handle_errors

ONNX_NAME = "model.onnx"


def _slug(model: str) -> str:
    name = Path(model.rstrip("/\\")).name or "model"
    for suffix in (".safetensors", ".pth", ".pt", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or "model"


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def print_export(report: dict[str, Any], artifact: Path) -> None:
    from rich.table import Table

    table = Table(title=f"exported {artifact / report['file']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("opset / batch", f"{report['opset']} / {report['batch']}")
    table.add_row("size", f"{report['bytes'] / 1e6:.2f} MB")
    table.add_row("exporter", f"{report['exporter']} (torch {report['torch_version']})")
    v = report.get("validation")
    if v is None:
        table.add_row("validation", "[yellow]skipped (--no-validate)[/]")
    else:
        verdict = "[green]pass[/]" if v["passed"] else "[red]FAILED, kept by --force[/]"
        f = v["fidelity"]
        sqnr = min(x for x in (f["sqnr_db"], f["token_sqnr_db"]) if x is not None)
        table.add_row("vs torch (ORT CPU)", f"max abs {f['max_abs']:.2e}, cosine {f['image_cosine_min']:.6f}, SQNR {sqnr:.1f} dB")
        table.add_row(f"{v['gate']['precision']} gate", verdict)
    table.add_row("seconds", f"export {report['export_seconds']:.1f}" + (f", validate {v['seconds']:.1f}" if v else ""))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("export")
    @handle_errors
    def export(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        output: Optional[Path] = typer.Option(
            None, "-o", "--output",
            help="Artifact directory to write model.onnx into (default: MODEL itself when it is an artifact, else ./<model>-mimc).",
        ),
        batch: str = typer.Option("1", "--batch", help="Static batch size, or 'dynamic' for a dynamic batch axis."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17: LayerNormalization stays one node)."),
        exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default) or dynamo."),
        force: bool = typer.Option(False, "--force", help="Keep a graph that fails the fidelity gate (recorded as failed)."),
        validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare the graph with torch on ONNX Runtime."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory (non-artifact MODEL)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the deterministic validation inputs."),
        json_out: bool = JsonOption,
    ) -> None:
        """Export to ONNX (input pixel_values; outputs last_hidden_state, pooled) and validate it."""
        from mimc.artifact import atomic_dir, is_artifact, save_artifact
        from mimc.errors import BadInputError
        from mimc.deploy.onnx import check_export_options, export_onnx
        from mimc.models.resolve import describe_source, load_model

        batch_value = check_export_options(batch, opset, exporter, "fp32")  # exit 2 before any loading
        kind = describe_source(model)  # nonexistent path / not a model -> exit 2
        in_place = kind == "artifact" and (output is None or _same_dir(output, Path(model)))
        if in_place:
            out_dir = Path(model)
        else:
            out_dir = output if output is not None else Path(f"{_slug(model)}-mimc")
            if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
                hint = f" (to export into that artifact, run `mimc export {out_dir}`)" if is_artifact(out_dir) else ""
                raise BadInputError(f"output {out_dir} already exists and is not empty: choose another -o or pass --overwrite{hint}")
        with console.status(f"loading {model}"):
            encoder = load_model(model)
        options = dict(batch=batch_value, opset=opset, exporter=exporter, validate=validate, force=force, seed=seed)
        with console.status(f"exporting and validating {out_dir / ONNX_NAME}"):
            if in_place:
                report = export_onnx(encoder, out_dir / ONNX_NAME, **options)
            else:
                # Files listed by the source artifact (other graphs, engines) do not come along.
                if getattr(encoder, "manifest", None) is not None:
                    encoder.manifest.files = {}
                # Weights, manifest and graph appear together or not at all.
                with atomic_dir(out_dir, overwrite=overwrite) as tmp:
                    save_artifact(encoder, tmp, overwrite=True)
                    report = export_onnx(encoder, tmp / ONNX_NAME, **options)
                report["path"] = str(out_dir / ONNX_NAME)
        report["artifact"] = str(out_dir)
        if json_out:
            emit_json(report)
        else:
            print_export(report, out_dir)
