"""Fidelity of int8/fp8 graphs of `ref` per calibration method, with and without outlier folding.

`ref` (the built-in reference MAE) on the built-in labelled images: a seeded calibration subset
and a disjoint evaluation subset. For each recipe: pooled-feature cosine to the fp32 graph (mean
and worst image) and leave-one-out k-NN top-1 (mimc.metrics.knn_top1) of fp32 vs quantized
features on the evaluation images, and the drop in points. Targets (issue 3): cosine >= 0.99 and
k-NN drop <= 1 point with the default recipe.

    python benchmarks/ref_quantize_table.py [--calib 128] [--model ref]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "ref_quantize_table.json"

# (label, QuantizeConfig options); the first row is mimc's default recipe for the cpu target.
RECIPES = [
    ("default (percentile, cpu)", {}),
    ("minmax", {"method": "minmax"}),
    ("entropy", {"method": "entropy"}),
    ("percentile + smooth 0.5", {"smooth": 0.5}),
    ("minmax + smooth 0.5", {"method": "minmax", "smooth": 0.5}),
    ("entropy + smooth 0.5", {"method": "entropy", "smooth": 0.5}),
    ("percentile + repq", {"repq": True}),
    ("minmax + repq", {"method": "minmax", "repq": True}),
    ("percentile + smooth 0.5 + repq", {"smooth": 0.5, "repq": True}),
    ("percentile + attention matmuls int8", {"quantize_attention_matmuls": True}),
    ("tensorrt int8 Q/DQ (emulated)", {"target": "tensorrt"}),
    ("tensorrt int8 Q/DQ + smooth 0.5", {"target": "tensorrt", "smooth": 0.5}),
    ("fp8 E4M3 minmax (emulated)", {"precision": "fp8", "method": "minmax"}),
]


def features(path: Path, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnx

    from mimc.runtime.session import onnxruntime, run_onnx, session_options

    ort = onnxruntime()
    so = session_options(threads=2)
    # Q/DQ graphs for TensorRT/FP8 are run as written (fusions off): the float emulation of their math.
    if any(n.op_type == "DequantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return np.concatenate([run_onnx(sess, pixels[i : i + batch])["pooled"] for i in range(0, len(pixels), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--calib", type=int, default=128, help="calibration images (the rest are evaluated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.data import load_images
    from mimc.metrics import knn_top1
    from mimc.deploy.onnx import export_onnx
    from mimc.models.resolve import load_model

    torch.set_num_threads(2)
    encoder = load_model(args.model)
    images = load_images("builtin", encoder.config)
    order = np.random.default_rng(args.seed).permutation(len(images))
    calib, evaluation = images.subset(np.sort(order[: args.calib])), images.subset(np.sort(order[args.calib :]))
    labels = evaluation.labels
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        fp32 = Path(tmp_dir) / "model.onnx"
        export_onnx(encoder, fp32, batch="dynamic")
        ref_feats = features(fp32, evaluation.pixels.numpy())
        ref_knn = knn_top1(ref_feats, labels)
        print(f"fp32: k-NN top-1 {100 * ref_knn:.2f} % on {len(evaluation)} images ({len(calib)} calibration images, disjoint)")
        for label, options in RECIPES:
            config = QuantizeConfig(n=args.calib, **options)
            out = Path(tmp_dir) / f"q{len(rows)}.onnx"
            start = time.perf_counter()
            report = quantize_onnx(fp32, out, calib.batches(32), config, evaluation.batches(64), force=True)
            feats = features(out, evaluation.pixels.numpy())
            cos = np.sum(feats * ref_feats, 1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref_feats, axis=1))
            knn = knn_top1(feats, labels)
            fid = report["validation"]["fidelity"]
            rows.append({
                "recipe": label, "config": config.to_dict(), "target": config.resolved_target,
                "pooled_cosine_mean": round(float(cos.mean()), 5), "pooled_cosine_min": round(float(cos.min()), 5),
                "sqnr_db": round(min(v for v in (fid["sqnr_db"], fid["token_sqnr_db"]) if v is not None), 2), "knn_top1": round(100 * knn, 2),
                "knn_drop_points": round(100 * (ref_knn - knn), 2), "gate_passed": report["validation"]["passed"],
                "runnable_here": report["runnable_here"], "seconds": round(time.perf_counter() - start, 1),
            })
            r = rows[-1]
            print(f"  {label}: cosine {r['pooled_cosine_mean']:.4f} (min {r['pooled_cosine_min']:.4f}), "
                  f"k-NN {r['knn_top1']:.2f} % ({r['knn_drop_points']:+.2f} drop)", file=sys.stderr)
    print("\n| recipe | target | pooled cosine (mean / worst) | SQNR dB | k-NN top-1 % | k-NN drop (points) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print(f"| fp32 | - | 1 / 1 | - | {100 * ref_knn:.2f} | 0 |")
    for r in rows:
        print(f"| {r['recipe']} | {r['target']} | {r['pooled_cosine_mean']:.5f} / {r['pooled_cosine_min']:.5f} | "
              f"{r['sqnr_db']:.1f} | {r['knn_top1']:.2f} | {r['knn_drop_points']:.2f} |")
    from mimc.models.resolve import _ref_sha

    result = {"benchmark": "ref_quantize_table", "model": args.model, "model_sha256": _ref_sha() if args.model == "ref" else None,
              "data": "builtin", "calibration_images": len(calib), "evaluation_images": len(evaluation),
              "calibration_sha256": calib.sha256, "fp32_knn_top1": round(100 * ref_knn, 2), "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
