"""Token reduction on ViT-B/16 224, ONNX Runtime CPU: measured latency vs the theoretical MAC ratio.

One run: a random-init ViT-B/16 (mimc.models.vit.vit_base_config) exported dense and with each
method at about half of the tokens, timed at batch 1 with 2 intra-op threads, spinning off, each
session warmed up, timed in alternating blocks of iterations; medians quoted. The target is a
measured speed-up of at least 0.9x the theoretical one (MACs of linears + attention matmuls with
the per-block token counts; the merge/select overhead is what the gap measures).

    /work/venv/bin/python benchmarks/bench_tokens_vitb.py [--rounds 12] [--block 4]

Prints a markdown table and writes benchmarks/results/bench_tokens_vitb.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimc.compression.registry import compress  # noqa: E402
from mimc.compression.tokens import TokenReductionConfig  # noqa: E402
from mimc.deploy.onnx import export_onnx  # noqa: E402
from mimc.models.vit import build_encoder, flops_per_image, vit_base_config  # noqa: E402

from _common import session  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tokens_vitb.json"

# Settings at ~50 % of the dense MACs (ToMe with a decreasing schedule: 197 -> 34 tokens).
METHODS = {
    "tome r=14 (inflection -0.5)": TokenReductionConfig(method="tome", r=14, inflection=-0.5),
    "topk keep 0.5 at 4,7,10 (fuse)": TokenReductionConfig(method="topk", keep=0.5, at=(4, 7, 10)),
    "drop keep 0.5 (grid)": TokenReductionConfig(method="drop", keep=0.5, pattern="grid"),
    "drop keep 0.5 (variance)": TokenReductionConfig(method="drop", keep=0.5, pattern="variance"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=4, help="iterations per timed block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = build_encoder(vit_base_config(), seed=0)
    macs_dense = flops_per_image(dense.config)
    models = {"dense": (dense, {"macs_ratio": 1.0, "tokens_per_block": [dense.config.num_tokens] * 13, "fidelity": None})}
    for label, cfg in METHODS.items():
        enc, record = compress(dense, cfg)
        m = record.metrics
        models[label] = (enc, {"macs_ratio": m["macs_ratio"], "tokens_per_block": m["tokens_per_block"],
                               "fidelity": m["fidelity_deterministic"]["pooled_cosine_mean"]})

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    sessions, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (enc, meta)) in enumerate(models.items()):
            path = Path(tmp) / f"m{i}.onnx"
            report = export_onnx(enc, path, batch=1)
            sessions[label] = session(path, args.threads)
            info[label] = {**meta, "onnx_max_abs_err": report["validation"]["max_abs"]}
            print(f"exported {label}: max abs err vs torch {report['validation']['max_abs']:.2e}", file=sys.stderr)
        feeds = {label: {s.get_inputs()[0].name: x} for label, s in sessions.items()}
        for label, s in sessions.items():
            for _ in range(args.warmup):
                s.run(None, feeds[label])
        times: dict[str, list[float]] = {label: [] for label in sessions}
        labels = list(sessions)
        for rnd in range(args.rounds):
            order = labels if rnd % 2 == 0 else labels[::-1]  # alternate so drift hits all alike
            for label in order:
                s, feed = sessions[label], feeds[label]
                start = time.perf_counter()
                for _ in range(args.block):
                    s.run(None, feed)
                times[label].append((time.perf_counter() - start) / args.block * 1000)

    dense_ms = statistics.median(times["dense"])
    rows = []
    for label in labels:
        ms = statistics.median(times[label])
        theory = 1.0 / info[label]["macs_ratio"]
        measured = dense_ms / ms
        rows.append({
            "model": label,
            "median_ms": round(ms, 2),
            "iqr_ms": [round(float(np.percentile(times[label], q)), 2) for q in (25, 75)],
            "measured_speedup": round(measured, 3),
            "theoretical_speedup": round(theory, 3),
            "measured_over_theoretical": round(measured / theory, 3),
            "meets_0.9": measured >= 0.9 * theory,
            "mean_tokens_per_block": round(sum(info[label]["tokens_per_block"][:-1]) / 12, 1),
            "pooled_cosine_to_dense": info[label]["fidelity"],
            "onnx_max_abs_err": info[label]["onnx_max_abs_err"],
        })
    print("| model | median ms | measured speed-up | theoretical (MACs) | measured / theoretical | mean tokens/block | pooled cos to dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cos = "-" if r["pooled_cosine_to_dense"] is None else f"{r['pooled_cosine_to_dense']:.4f}"
        print(f"| {r['model']} | {r['median_ms']:.1f} | {r['measured_speedup']:.2f}x | {r['theoretical_speedup']:.2f}x | "
              f"{r['measured_over_theoretical']:.2f} | {r['mean_tokens_per_block']} | {cos} |")
    import onnxruntime as ort

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "bench_tokens_vitb",
        "model": "random-init ViT-B/16 224 (vit_base_config, seed 0), batch 1, fp32",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op threads, spinning off",
        "timing": f"{args.warmup} warm-up runs per session, {args.rounds} alternating rounds of {args.block} iterations, medians",
        "macs_dense": macs_dense,
        "rows": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
