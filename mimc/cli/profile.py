"""``mimc profile MODEL.onnx --device cpu``: measured latency (or, with --predict, a roofline estimate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, echo_tensorrt, handle_errors, status
from mimc.cli.render import columns, line, note, show


def register(app: typer.Typer) -> None:
    @app.command("profile")
    @handle_errors(flags={"batch_sizes": "--batch"})
    def profile(
        model: Path = typer.Argument(..., help="An .onnx graph (mimc export writes <artifact>/model.onnx), an OpenVINO .xml IR or a TensorRT .plan."),
        device: str = typer.Option("cpu", "--device", "-d", help="A device profile name (see `mimc profiles`) or a profile .yaml."),
        batch: Optional[str] = typer.Option(None, "--batch", "-b", help="Batch sizes, e.g. 1,8 (default: the graph's static batch, else the profile's)."),
        iters: int = typer.Option(50, "--iters", help="Timed runs per batch size."),
        warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the profile's, else all cores)."),
        predict: bool = typer.Option(False, "--predict", help="Roofline estimate from the graph instead of a measurement."),
        precision: Optional[str] = typer.Option(None, "--precision", help="openvino-cpu: fp32 (default), bf16, int8 or int8-bf16 (int8 graph, bf16 float layers); with --predict: the precision priced."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the JSON report to this file."),
        json_out: bool = JsonOption,
    ) -> None:
        """Latency p50/p90/p99, throughput and peak memory per batch size; labelled measured or predicted."""
        with status(f"profiling {model}") as spinner:
            report = api.profile(model, device, batch_sizes=batch, warmup=warmup, iters=iters,
                                  threads=threads, predict=predict, output=output, on_message=echo_tensorrt, precision=precision,
                                  on_batch=lambda b: spinner.update(f"{'predicting' if predict else 'profiling'} {model.name} at batch {b}"))
        show(report, json_out, lambda r: _human(r, output))


def _human(r: dict, output: Optional[Path]) -> None:
    title = f"{r['label']}: {r['model']} on {r['device']} ({r['backend']})"
    if r["label"] == "measured":
        columns(title, ["batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "peak RSS MB", "session MB"],
                [[str(x["batch"]), f"{x['p50_ms']:.3f}", f"{x['p90_ms']:.3f}", f"{x['p99_ms']:.3f}", f"{x['mean_ms']:.3f}",
                  f"{x['throughput_items_s']:.1f}", _mb(x.get("peak_rss_mb")), _mb(x.get("session_mb"))] for x in r["results"]])
        if "openvino_version" in r:
            line(f"[dim]OpenVINO {r['openvino_version']} CPU, {r['threads']} threads, runtime precision {r['runtime_precision']}[/]")
        elif "threads" in r:
            line(f"[dim]ONNX Runtime {r['onnxruntime_version']}, {r['provider']}, {r['threads']} threads, {r['warmup']} warm-up + "
                 f"{r['iters']} timed runs; memory: {r['memory_method']}[/]")
        if r.get("note"):
            note(r["note"])
    else:
        columns(title, ["batch", "latency ms", "items/s", "GMACs", "bound by compute / memory ms", "precision"],
                [[str(x["batch"]), f"{x['latency_ms']:.4f}", _mb(x["throughput_per_s"]), f"{x['gmacs']:.3f}",
                  f"{x['compute_bound_ms']:.4f} / {x['memory_bound_ms']:.4f}", str(x["precision"])] for x in r["results"]])
        line("[dim]predicted: a roofline lower bound from FLOPs and bytes, not a measurement[/]")
        for text in dict.fromkeys(t for x in r["results"] for t in x.get("notes", [])):  # each once, in batch order
            note(text)
    if output is not None:
        line(f"report written to {output}")


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"
