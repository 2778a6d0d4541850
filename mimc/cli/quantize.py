"""``mimc quantize MODEL --int8|--fp8 --calib DIR``: a calibrated Q/DQ graph beside the fp32 one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, handle_errors, reads_images, status
from mimc.cli.render import line, note, show


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @handle_errors(flags={"data": "--calib", "quantize_attention_matmuls": "--attention", "overflow_fix": "--overflow-fix"})
    @reads_images("calib")
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
        overflow_fix: Optional[str] = typer.Option(None, "--overflow-fix", help="--device openvino-cpu: 7-bit weights on none, "
                                                   "first_layer or all layers (default: first_layer with VNNI, measured without)."),
        device: str = typer.Option("cpu", "--device", help="Target device profile (cpu, h100, ...) or a profile .yaml: picks the graph layout."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .onnx (default: model.int8.onnx beside the input)."),
        force: bool = typer.Option(False, "--force", help="Write the graph even when it fails the fidelity gate."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file, or a graph that has graphs made from it (IR, engine), removing them."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Calibrate and quantize (W8A8 or FP8) with optional outlier folding; gate fidelity on held-out images."""
        if int8 and fp8:
            raise api.ConfigError("--int8 and --fp8 exclude each other: pass one of them")
        precision = "fp8" if fp8 else "int8"
        with status(f"quantizing {model} to {precision} ({method})"):
            report = api.quantize(model, calib, output, precision=precision, device=device, seed=seed, force=force, overwrite=overwrite,
                                   method=method, n=n, percentile=percentile, smooth=smooth, repq=repq,
                                   quantize_attention_matmuls=attention, fuse_attention=fuse_attention,
                                   **({"overflow_fix": overflow_fix} if overflow_fix else {}))
        show(report, json_out, _human)


def _human(r: dict) -> None:
    val = r["validation"]
    fid = val["fidelity"]
    fused = f", {r['fused_attention_blocks']} blocks fused into QAttention" if r["fused_attention_blocks"] else ""
    line(f"{r['precision']} {r['target']} graph: {r['quantized_linears']} linears + {r['quantized_attention_matmuls']} attention "
         f"matmuls quantized{fused}, calibrated on {r['calibration_images']} images ({r['config']['method']}); pooled cosine "
         f"to fp32 {fid['pooled_cosine_mean']:.4f} (worst {fid['image_cosine_min']:.4f}), SQNR {fid['sqnr_db']:.1f} dB on {fid['n_images']} "
         f"{val['inputs']}: gate {'[green]passed[/]' if val['passed'] else '[red]FAILED (forced)[/]'}")
    if r.get("overflow_fix"):
        note(f"{r['quantized_convs']} conv quantized; 7-bit weights: {r['overflow_fix']}"
             + (f" (SQNR dB by layout through OpenVINO: {r['overflow_fix_sqnr_db']})" if r.get("overflow_fix_sqnr_db") else ""))
    if not r["runnable_here"]:
        note(f"not runnable here: {r['runnable_note']}")
    line(f"wrote {r['path']}")
