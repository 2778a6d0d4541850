"""Roofline prediction on the `cpu` profile vs measured ONNX Runtime CPU latency: ViT-B dense, 50 % blocks, int8.

The prediction is mimc.latency.roofline.predict (sum over nodes of max(FLOPs / peak, bytes / bandwidth))
with mimc/profiles/cpu.yaml; the measurement is ONNX Runtime's CPU provider in this process, 2 intra-op
threads, ``session.intra_op.allow_spinning=0``, each session warmed up, timed in blocks of iterations
alternating between graphs, medians quoted. Process CPU time per run is reported beside wall time:
on a shared machine the wall clock also measures the neighbours, and CPU time per thread is the
closer estimate of what the graph costs on an idle machine.

Graphs (random-init weights; latency does not depend on the values):
  dense     ViT-B/16 224, mimc export (TorchScript, opset 17, batch 1)
  50% blocks  mimc prune --ratio 0.5 (criterion 'last': which blocks go does not change the cost)
  int8      mimc's quantize stage (mimc.quant.quantize, target cpu) on 16 builtin calibration images

    python benchmarks/roofline_cpu.py [--rounds 6] [--iters 3] [--threads 2]

Prints a markdown table; writes benchmarks/results/roofline_cpu.md and roofline_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import cpu_seconds, session

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=3, help="iterations per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=16)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from mimc.compression.blocks import BlockPruningConfig
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.compression.registry import compress
    from mimc.data import load_images
    from mimc.deploy.onnx import export_onnx
    from mimc.models.vit import build_encoder, vit_base_config
    from mimc.latency.devices import load_profile
    from mimc.latency.roofline import predict

    torch.set_num_threads(args.threads)
    profile = load_profile("cpu")
    cfg = vit_base_config()
    dense = build_encoder(cfg, seed=0)
    half, _ = compress(dense, BlockPruningConfig(ratio=0.5, criterion="last"))
    images = load_images("builtin", cfg, n=args.calib + 4, seed=0)
    calib = images.subset(np.arange(args.calib))
    held = images.subset(np.arange(args.calib, args.calib + 4))
    notes = {"dense": "fp32", "50% blocks": f"fp32, {half.config.depth} of {cfg.depth} blocks",
             "int8": "mimc quantize stage (int8 Q/DQ, target cpu)"}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        graphs = {"dense": tmp / "dense.onnx", "50% blocks": tmp / "half.onnx", "int8": tmp / "dense.int8.onnx"}
        export_onnx(dense, graphs["dense"], batch=1, validate=False)
        export_onnx(half, graphs["50% blocks"], batch=1, validate=False)
        quantize_onnx(graphs["dense"], graphs["int8"], calib.batches(8), QuantizeConfig(target="cpu", n=args.calib), held.batches(4))
        predicted = {name: predict(path, profile, batch=1) for name, path in graphs.items()}
        sessions = {name: session(path, args.threads) for name, path in graphs.items()}
        x = held.pixels[:1].numpy()
        for s in sessions.values():
            for _ in range(3):
                s.run(None, {"pixel_values": x})
        wall: dict[str, list[float]] = {n: [] for n in sessions}
        cpu: dict[str, list[float]] = {n: [] for n in sessions}
        for r in range(args.rounds):
            for name in (list(sessions) if r % 2 == 0 else list(reversed(sessions))):
                for _ in range(args.iters):
                    c, t = cpu_seconds(), time.perf_counter()
                    sessions[name].run(None, {"pixel_values": x})
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(cpu_seconds() - c)

    rows = []
    for name, p in predicted.items():
        w, c = float(np.median(wall[name])) * 1e3, float(np.median(cpu[name])) * 1e3
        rows.append({"graph": name, "precision": p["precision"], "gmacs": round(p["gmacs"], 3),
                     "predicted_ms": round(p["latency_ms"], 2), "bound": p["bound"],
                     "measured_wall_ms": round(w, 2), "measured_cpu_ms_per_thread": round(c / args.threads, 2),
                     "measured_over_predicted": round(w / p["latency_ms"], 3), "notes": notes[name]})
    lines = ["| graph | precision | GMACs | predicted ms (roofline, cpu.yaml) | measured ms (ORT CPU, median wall) | measured / predicted | CPU ms per thread per run (median) | CPU / predicted | bound | graph notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['precision']} | {r['gmacs']:.2f} | {r['predicted_ms']:.1f} | {r['measured_wall_ms']:.1f} | "
                     f"{r['measured_over_predicted']:.2f} | {r['measured_cpu_ms_per_thread']:.1f} | "
                     f"{r['measured_cpu_ms_per_thread'] / r['predicted_ms']:.2f} | {r['bound']} | {r['notes']} |")
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None
    header = (f"Roofline on the `cpu` profile ({profile.peak_tflops} TFLOP/s, {profile.memory_bandwidth_gbs} GB/s) vs ONNX Runtime "
              f"{ort.__version__} CPU, {args.threads} threads, batch 1, {args.rounds} rounds x {args.iters} iters alternating, medians. "
              f"Load average at the end: {load} (shared machine: ratios are noisy).")
    table = "\n".join(lines)
    print(header + "\n\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "roofline_cpu.md").write_text(f"# Roofline vs measured, ViT-B/16 on ORT CPU\n\n{header}\n\n{table}\n\n"
                                             "Command: `python benchmarks/roofline_cpu.py`\n")
    (RESULTS / "roofline_cpu.json").write_text(json.dumps({
        "rows": rows, "threads": args.threads, "rounds": args.rounds, "iters": args.iters, "loadavg": load,
        "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(), "profile": profile.to_dict(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
