"""``mimc profile MODEL.onnx --device cpu``: measured latency (or, with --predict, a roofline estimate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc.cli.common import JsonOption, console, echo_tensorrt, emit_json, handle_errors


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    label = report["label"]
    title = f"{label}: {report['model']} on {report['device']} ({report['backend']})"
    table = Table(title=title, title_justify="left")
    table.add_column("batch", justify="right")
    if label == "measured":
        for name in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "peak RSS MB", "session MB"):
            table.add_column(name, justify="right")
        for r in report["results"]:
            table.add_row(
                str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}",
                f"{r['throughput_items_s']:.1f}", _mb(r.get("peak_rss_mb")), _mb(r.get("session_mb")),
            )
    else:
        for name in ("latency ms", "items/s", "GMACs", "bound by compute / memory ms", "precision"):
            table.add_column(name, justify="right")
        for r in report["results"]:
            table.add_row(
                str(r["batch"]), f"{r['latency_ms']:.4f}", f"{r['throughput_per_s']:.1f}", f"{r['gmacs']:.3f}",
                f"{r['compute_bound_ms']:.4f} / {r['memory_bound_ms']:.4f}", str(r["precision"]),
            )
    console.print(table)
    if label == "measured" and "threads" in report:
        console.print(
            f"ONNX Runtime {report['onnxruntime_version']}, {report['provider']}, {report['threads']} threads, "
            f"{report['warmup']} warm-up + {report['iters']} timed runs; memory: {report['memory_method']}",
            style="dim", highlight=False,
        )
    elif label == "predicted":
        console.print("predicted: a roofline lower bound from FLOPs and bytes, not a measurement", style="dim")
    if label == "measured" and report.get("note"):
        console.print(f"[yellow]note:[/] {report['note']}", highlight=False)


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def register(app: typer.Typer) -> None:
    @app.command("profile")
    @handle_errors
    def profile(
        model: Path = typer.Argument(..., help="An .onnx graph (mimc export writes <artifact>/model.onnx) or a TensorRT .plan."),
        device: str = typer.Option("cpu", "--device", "-d", help="A device profile name (see `mimc profiles`) or a profile .yaml."),
        batch: Optional[str] = typer.Option(None, "--batch", "-b", help="Batch sizes, e.g. 1,8 (default: the graph's static batch, else the profile's)."),
        iters: int = typer.Option(50, "--iters", help="Timed runs per batch size."),
        warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the profile's, else all cores)."),
        predict: bool = typer.Option(False, "--predict", help="Roofline estimate from the graph instead of a measurement."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the JSON report to this file."),
        json_out: bool = JsonOption,
    ) -> None:
        """Latency p50/p90/p99, throughput and peak memory per batch size; labelled measured or predicted."""
        from mimc.artifact import write_json
        from mimc.errors import BadInputError
        from mimc.latency.run import check_model_path, parse_batch_sizes
        from mimc.latency.run import profile as run_profile

        # Every bad input is refused before anything runs.
        check_model_path(model)
        sizes = parse_batch_sizes(batch)
        if output is not None and not output.parent.is_dir():
            raise BadInputError(f"output folder {output.parent} does not exist: create it or choose another -o")
        if output is not None and output.is_dir():
            raise BadInputError(f"output {output} is a directory: give a file path like report.json")
        with console.status(f"profiling {model}") as status:
            def on_batch(b: int) -> None:
                status.update(f"{'predicting' if predict else 'profiling'} {model.name} at batch {b}")

            report = run_profile(model, device=device, predict=predict, batch_sizes=sizes, warmup=warmup,
                                 iters=iters, threads=threads, on_batch=on_batch, on_message=echo_tensorrt)
        if output is not None:
            write_json(output, report)
        if json_out:
            emit_json(report)
        else:
            print_report(report)
            if output is not None:
                console.print(f"report written to {output}")
