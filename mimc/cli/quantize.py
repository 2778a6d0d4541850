"""``mimc quantize MODEL --int8|--fp8 --calib DIR``: a calibrated Q/DQ graph beside the fp32 one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @handle_errors
    def quantize(
        model: str = typer.Argument(..., help=MODEL_HELP + " Or an fp32 model.onnx written by mimc."),
        int8: bool = typer.Option(False, "--int8", help="INT8 W8A8 (the default)."),
        fp8: bool = typer.Option(False, "--fp8", help="FP8 E4M3 Q/DQ (opset 19) for Hopper / Ada TensorRT targets."),
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration images: a folder, .npz/.npy or 'builtin'."),
        n: int = typer.Option(256, "--n", help="Calibration images to use (32 more are held out for the fidelity gate)."),
        method: str = typer.Option("percentile", "--method", help="Calibration: minmax, percentile or entropy."),
        percentile: float = typer.Option(99.99, "--percentile", help="Percentile kept by --method percentile."),
        smooth: Optional[float] = typer.Option(None, "--smooth", help="SmoothQuant alpha in [0, 1], folded in before calibration."),
        repq: bool = typer.Option(False, "--repq", help="RepQ-ViT per-channel -> per-tensor reparameterization of LayerNorm outputs."),
        attention: bool = typer.Option(False, "--attention", help="Also quantize the two attention matmuls (default: float; see `mimc.quant.quantize`)."),
        fuse_attention: bool = typer.Option(True, "--fuse-attention/--no-fuse-attention",
                                            help="cpu target: run each block's qkv + float attention as one ORT QAttention kernel."),
        device: str = typer.Option("cpu", "--device", help="Target device profile (cpu, h100, ...) or a profile .yaml: picks the graph layout."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .onnx (default: model.int8.onnx beside the input)."),
        force: bool = typer.Option(False, "--force", help="Write the graph even when it fails the fidelity gate."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Calibrate and quantize (W8A8 or FP8) with optional outlier folding; gate fidelity on held-out images."""
        from mimc.quant.quantize import QuantizeConfig
        from mimc.quant.quantize_flow import quantize_model, target_for_device
        from mimc.errors import ConfigError

        if int8 and fp8:
            raise ConfigError("--int8 and --fp8 exclude each other: pass one of them")
        precision = "fp8" if fp8 else "int8"
        config = QuantizeConfig(precision=precision, method=method, n=n, percentile=percentile, smooth=smooth, repq=repq,
                                quantize_attention_matmuls=attention, fuse_attention=fuse_attention,
                                target=target_for_device(device, precision))
        with console.status(f"quantizing {model} to {precision} ({config.method}, {config.resolved_target})"):
            report = quantize_model(model, config, calib, output=output, seed=seed, force=force)
        if json_out:
            emit_json(report)
            return
        val = report["validation"]
        fid = val["fidelity"]
        status = "[green]passed[/]" if val["passed"] else "[red]FAILED (forced)[/]"
        console.print(
            f"{precision} {report['target']} graph: {report['quantized_linears']} linears"
            f" + {report['quantized_attention_matmuls']} attention matmuls quantized"
            f"{', ' + str(report['fused_attention_blocks']) + ' blocks fused into QAttention' if report['fused_attention_blocks'] else ''}"
            ", calibrated on"
            f" {report['calibration_images']} images ({config.method}); pooled cosine to fp32"
            f" {fid['pooled_cosine_mean']:.4f} (worst {fid['image_cosine_min']:.4f}), SQNR {fid['sqnr_db']:.1f} dB"
            f" on {fid['n_images']} {val['inputs']}: gate {status}",
            highlight=False,
        )
        if not report["runnable_here"]:
            console.print(f"[yellow]note:[/] not runnable here: {report['runnable_note']}", highlight=False)
        console.print(f"wrote {report['path']}", highlight=False)
