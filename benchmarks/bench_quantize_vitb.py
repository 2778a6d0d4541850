"""ViT-B/16 224, batch 1, ONNX Runtime CPU, 2 threads: fp32 vs onnxruntime's int8 recipes vs mimc static int8.

Peers: onnxruntime.quantization.quantize_dynamic on the exported graph, the same after
onnxruntime.transformers' optimizer (the recipe Optimum applies for CPU), and quantize_static QDQ.
mimc rows: the default CPU graph (static u8 x s8 MatMulIntegerToFloat, one QAttention per block),
the same without the attention fusion (ablation), and with int8 attention matmuls (``--attention``).

One run, all graphs timed in the same process: sessions with ``session.intra_op.allow_spinning=0``
and 2 intra-op threads, each warmed up, timed in blocks of iterations alternating between graphs
(round robin), medians quoted. Besides wall time, the process CPU time per run is reported: on a
machine shared with other jobs the wall clock measures the neighbours too, while CPU time (with
spinning off) measures the work each graph needs.

Random-init weights have no activation outliers, so fidelity here only shows the graphs compute the
same function; fidelity claims come from benchmarks/ref_quantize_table.py on `ref`.

    python benchmarks/bench_quantize_vitb.py [--rounds 24] [--iters 2] [--calib 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import cpu_seconds, session

RESULTS = Path(__file__).parent / "results" / "bench_quantize_vitb.json"


def _ort_transformer_optimized(src: Path, dst: Path, cfg) -> str:
    """onnxruntime.transformers' optimizer (model_type vit, python fusions only: ORT's own level-1
    passes would turn MatMul + Add into Gemm, which quantize_dynamic leaves in fp32)."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(src), model_type="vit", num_heads=cfg.num_heads, hidden_size=cfg.dim, opt_level=0)
    model.save_model_to_file(str(dst))
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    return ", ".join(f"{v} {k}" for k, v in sorted(stats.items())) or "no fusions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--iters", type=int, default=2, help="iterations per block")
    parser.add_argument("--calib", type=int, default=32, help="calibration images (builtin, resized to 224)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.data import load_images
    from mimc.deploy.onnx import export_onnx
    from mimc.models.vit import build_encoder, vit_base_config

    torch.set_num_threads(args.threads)
    cfg = vit_base_config()
    encoder = build_encoder(cfg, seed=0)
    images = load_images("builtin", cfg, n=args.calib + 8, seed=0)
    calib, held = images.subset(np.arange(args.calib)), images.subset(np.arange(args.calib, args.calib + 8))
    graphs: dict[str, Path] = {}
    notes: dict[str, str] = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        graphs["fp32"] = tmp / "model.onnx"
        export_onnx(encoder, graphs["fp32"], batch=1)
        t = time.perf_counter()
        graphs["ort quantize_dynamic"] = tmp / "dynamic.onnx"
        quantize_dynamic(str(graphs["fp32"]), str(graphs["ort quantize_dynamic"]), weight_type=QuantType.QInt8)
        notes["ort quantize_dynamic"] = f"defaults (per-tensor s8 weights), {time.perf_counter() - t:.1f} s"
        t = time.perf_counter()
        graphs["ort transformers optimizer + quantize_dynamic"] = tmp / "dynamic_opt.onnx"
        fused = _ort_transformer_optimized(graphs["fp32"], tmp / "fp32_opt.onnx", cfg)
        quantize_dynamic(str(tmp / "fp32_opt.onnx"), str(graphs["ort transformers optimizer + quantize_dynamic"]),
                         weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})  # 1: FLOAT, for contrib-op outputs
        notes["ort transformers optimizer + quantize_dynamic"] = f"Optimum's CPU recipe: {fused}, {time.perf_counter() - t:.1f} s"

        import onnx

        fp32_model = onnx.load(str(graphs["fp32"]))
        inits = {i.name for i in fp32_model.graph.initializer}
        attn = [n.name for n in fp32_model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib.pixels.numpy()[i : i + 1] for i in range(len(calib)))

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {"pixel_values": x}

        t = time.perf_counter()
        graphs["ort quantize_static QDQ"] = tmp / "static_qdq.onnx"
        os.chdir(tmp)  # ORT's shape inference may drop temp files in the working directory
        quantize_static(str(graphs["fp32"]), str(graphs["ort quantize_static QDQ"]), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=attn, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.chdir(cwd)
        notes["ort quantize_static QDQ"] = f"MatMul linears only, u8/s8 per-channel, MinMax, {time.perf_counter() - t:.1f} s"
        reports = {}
        variants = (("mimc int8 (cpu default: QAttention fused)", QuantizeConfig(target="cpu")),
                    ("mimc int8, attention not fused (ablation)", QuantizeConfig(target="cpu", fuse_attention=False)),
                    ("mimc int8 + int8 attention matmuls", QuantizeConfig(target="cpu", quantize_attention_matmuls=True)))
        for name, config in variants:
            t = time.perf_counter()
            graphs[name] = tmp / f"mimc_{len(reports)}.onnx"
            reports[name] = quantize_onnx(graphs["fp32"], graphs[name], calib.batches(8), config, held.batches(8))
            notes[name] = (f"{config.method}, {reports[name]['fused_attention_blocks']} QAttention, "
                           f"{reports[name]['quantized_attention_matmuls']} int8 attention matmuls, {time.perf_counter() - t:.1f} s")

        sessions = {name: session(path, args.threads) for name, path in graphs.items()}
        x = held.pixels[:1].numpy()
        ref = sessions["fp32"].run(None, {"pixel_values": x})[1]
        cosine = {}
        for name, s in sessions.items():
            for _ in range(3):  # warm-up
                out = s.run(None, {"pixel_values": x})[1]
            cosine[name] = float(np.sum(out * ref) / (np.linalg.norm(out) * np.linalg.norm(ref)))
        wall: dict[str, list[float]] = {n: [] for n in sessions}
        cpu: dict[str, list[float]] = {n: [] for n in sessions}
        for r in range(args.rounds):
            order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for name in order:
                for _ in range(args.iters):
                    c, t = cpu_seconds(), time.perf_counter()
                    sessions[name].run(None, {"pixel_values": x})
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(cpu_seconds() - c)
        sizes = {n: p.stat().st_size for n, p in graphs.items()}

    base_w, base_c = np.median(wall["fp32"]), np.median(cpu["fp32"])
    dyn_w = np.median(wall["ort quantize_dynamic"])
    rows = []
    for name in sessions:
        w, c = float(np.median(wall[name])), float(np.median(cpu[name]))
        rows.append({"graph": name, "wall_ms_median": round(w * 1e3, 2), "wall_ms_min": round(float(np.min(wall[name])) * 1e3, 2),
                     "speedup_wall": round(base_w / w, 3), "vs_quantize_dynamic_wall": round(dyn_w / w, 3),
                     "cpu_ms_median": round(c * 1e3, 2), "speedup_cpu": round(base_c / c, 3),
                     "pooled_cosine_vs_fp32": round(cosine[name], 6), "mb": round(sizes[name] / 1e6, 1), "notes": notes.get(name, "")})
    print("| graph | wall ms (median) | vs fp32 | vs quantize_dynamic | CPU ms (median) | vs fp32 | cosine to fp32 | MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['graph']} | {r['wall_ms_median']:.1f} | {r['speedup_wall']:.2f}x | {r['vs_quantize_dynamic_wall']:.2f}x | "
              f"{r['cpu_ms_median']:.1f} | {r['speedup_cpu']:.2f}x | {r['pooled_cosine_vs_fp32']:.5f} | {r['mb']:.0f} |")
    mimc = rows[[r["graph"] for r in rows].index(variants[0][0])]
    verdict = {"mimc_vs_fp32": mimc["speedup_wall"], "mimc_vs_quantize_dynamic": mimc["vs_quantize_dynamic_wall"],
               "target": "mimc >= 2.5x fp32 and > 1x quantize_dynamic (wall medians, this run)",
               "met": bool(mimc["speedup_wall"] >= 2.5 and mimc["vs_quantize_dynamic_wall"] > 1.0)}
    print(f"\nmimc default: {verdict['mimc_vs_fp32']:.2f}x fp32, {verdict['mimc_vs_quantize_dynamic']:.2f}x quantize_dynamic "
          f"-> target {'met' if verdict['met'] else 'NOT met'} in this run")
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None
    result = {
        "benchmark": "bench_quantize_vitb", "model": "ViT-B/16 224 random init (seed 0)", "batch": 1,
        "threads": args.threads, "rounds": args.rounds, "iters_per_block": args.iters, "calibration_images": args.calib,
        "onnxruntime": ort.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "load_average_at_end": load, "verdict": verdict, "rows": rows,
        "mimc_reports": {k: {kk: v[kk] for kk in ("method", "quantized_linears", "quantized_attention_matmuls", "fused_attention_blocks", "validation")}
                         for k, v in reports.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average {load}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
