"""Stacking the stages on ViT-B/16 224, ONNX Runtime CPU: blocks, tokens and int8 compound.

One run: a random-init ViT-B/16 exported dense, with half its MLP neurons removed (width, l2),
with half its blocks removed (entropy), with half its patches dropped too (MAE-native grid), with
all three, and each of those quantized to mimc's CPU int8 graph;
timed at batch 1 with 2 intra-op threads, spinning off, in alternating rounds (medians). The MAC
ratio is the theory for the fp32 rows; int8 adds the integer GEMMs' speed-up on top. Random
weights: fidelity claims come from the `ref` tables (benchmarks/ref_*.py), not from here.

    python benchmarks/bench_stack_vitb.py [--rounds 16] [--iters 2] [--calib 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import session

RESULTS = Path(__file__).parent / "results" / "bench_stack_vitb.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2, help="iterations per block")
    parser.add_argument("--calib", type=int, default=16, help="calibration images (builtin, resized to 224)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from mimc.compression.blocks import BlockPruningConfig
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.compression.registry import compress
    from mimc.compression.tokens import TokenReductionConfig
    from mimc.compression.width import WidthPruningConfig
    from mimc.data import load_images
    from mimc.deploy.onnx import export_onnx
    from mimc.models.vit import build_encoder, flops_per_image, vit_base_config

    torch.set_num_threads(args.threads)
    dense = build_encoder(vit_base_config(), seed=0)
    half, _ = compress(dense, BlockPruningConfig(ratio=0.5))
    half_drop, _ = compress(half, TokenReductionConfig(method="drop", keep=0.5))
    narrow, _ = compress(dense, WidthPruningConfig(mlp=0.5))
    narrow_all, _ = compress(half_drop, WidthPruningConfig(mlp=0.5))
    encoders = {"dense": dense, "50% MLP width": narrow, "50% blocks": half, "50% blocks + 50% patches": half_drop,
                "50% blocks + 50% patches + 50% MLP width": narrow_all}
    images = load_images("builtin", dense.config, n=args.calib + 8, seed=0)
    calib, held = images.subset(np.arange(args.calib)), images.subset(np.arange(args.calib, args.calib + 8))
    paths, macs, notes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for i, (label, enc) in enumerate(encoders.items()):
            paths[f"{label}, fp32"] = tmp / f"m{i}.onnx"
            export_onnx(enc, paths[f"{label}, fp32"], batch=1)
            macs[f"{label}, fp32"] = macs[f"{label}, int8"] = flops_per_image(enc.config)
            paths[f"{label}, int8"] = tmp / f"m{i}.int8.onnx"
            report = quantize_onnx(paths[f"{label}, fp32"], paths[f"{label}, int8"], calib.batches(8), QuantizeConfig(target="cpu"),
                                   held.batches(8))
            notes[f"{label}, int8"] = {"pooled_cosine_vs_its_fp32_graph": report["validation"]["fidelity"]["pooled_cosine_mean"],
                                       "fused_attention_blocks": report["fused_attention_blocks"]}
        sessions = {label: session(path, args.threads) for label, path in paths.items()}
        x = held.pixels[:1].numpy()
        for s in sessions.values():
            for _ in range(3):
                s.run(None, {"pixel_values": x})
        wall: dict[str, list[float]] = {label: [] for label in sessions}
        labels = list(sessions)
        for r in range(args.rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                for _ in range(args.iters):
                    t = time.perf_counter()
                    sessions[label].run(None, {"pixel_values": x})
                    wall[label].append(time.perf_counter() - t)

    base = float(np.median(wall["dense, fp32"]))
    rows = []
    for label in labels:
        ms = float(np.median(wall[label]))
        rows.append({"graph": label, "median_ms": round(ms * 1e3, 2), "speedup_vs_dense_fp32": round(base / ms, 3),
                     "macs_ratio_theory": round(macs["dense, fp32"] / macs[label], 3), **notes.get(label, {})})
    print("| graph | median ms | vs dense fp32 | MAC ratio (theory for fp32) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['graph']} | {r['median_ms']:.1f} | {r['speedup_vs_dense_fp32']:.2f}x | {r['macs_ratio_theory']:.2f}x |")
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "bench_stack_vitb", "model": "ViT-B/16 224 random init (seed 0)", "batch": 1, "threads": args.threads,
        "rounds": args.rounds, "iters_per_block": args.iters, "onnxruntime": ort.__version__, "python": sys.version.split()[0],
        "load_average_at_end": load, "rows": rows,
    }, indent=2) + "\n")
    print(f"\nload average {load}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
