"""k-NN at scale: mimc.metrics.knn_top1 (queries in blocks, never N x N) on 50 000 x 768 features.

Random float32 features (standard normal, seeded) with random labels over 1000 classes — the
accuracy is chance (~0.001) by construction; what is measured is time, memory and agreement:

  leave-one-out   50 000 images, each classified by the other 49 999
  gallery-query   45 000 gallery images, 5 000 query images
  agreement       on a 5 000-image subset (and 4 500 / 500 gallery-query), the blocked predictions
                  against knn_predictions_dense (the whole N x N matrix, what knn_top1 computed
                  before), at the default block and at blocks of 337 (not a divisor of 5000) and 1000 rows

Each timed case runs in a fresh subprocess. Its memory is the growth of the peak resident set
(VmHWM in /proc/self/status) over the resident set once the features exist: the peak is reset
after the features are made (writing 5 to /proc/self/clear_refs) where the kernel allows it,
and the features are generated in place as float32, so neither they nor their generation count.
k-NN settings are mimc's: k = 10, cosine in float64, weights exp(sim / 0.07), 256 MiB blocks.

    python benchmarks/bench_knn.py [--n 50000] [--dim 768] [--classes 1000] [--subset 5000]

Prints a markdown table; writes benchmarks/results/bench_knn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 standard normal features made in place (no float64 temporary) and labels."""
    rng = np.random.default_rng(seed)
    feats = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):
        rng.standard_normal(out=feats[start : start + 4096], dtype=np.float32)
    return feats, rng.integers(0, classes, n)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(case: str, n: int, dim: int, classes: int, gallery: int) -> dict:
    """One timed case in this (fresh) process: seconds and peak memory growth over the features."""
    import torch

    from mimc.metrics import KNN_BLOCK_BYTES, knn_block_rows, knn_top1

    feats, labels = features(n, dim, classes)
    torch.zeros(1) @ torch.zeros(1)  # load the BLAS before measuring
    reset = _reset_peak()
    rss = _status_kb("VmRSS")
    start = time.perf_counter()
    if case == "leave-one-out":
        n_gallery, n_queries = n, n
        top1 = knn_top1(feats, labels)
    else:
        n_gallery, n_queries = gallery, n - gallery
        top1 = knn_top1(feats[:gallery], labels[:gallery], queries=feats[gallery:], query_labels=labels[gallery:])
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    rows = min(knn_block_rows(n_gallery), n_queries)
    return {
        "case": case, "n_gallery": n_gallery, "n_queries": n_queries,
        "dim": dim, "classes": classes, "top1": round(top1, 5), "seconds": round(seconds, 1),
        "features_mb": round(feats.nbytes / 2**20, 1), "peak_growth_mb": round((peak - rss) / 1024, 1),
        "peak_reset": reset, "block_rows": rows, "block_mb": round(8 * rows * n_gallery / 2**20, 1),
        "block_budget_mb": KNN_BLOCK_BYTES / 2**20, "torch_threads": torch.get_num_threads(),
    }


def agreement(subset: int, dim: int, classes: int) -> dict:
    """Blocked vs dense predictions on ``subset`` images: leave-one-out and a 90 / 10 gallery-query split."""
    from mimc.metrics import knn_predictions, knn_predictions_dense

    feats, labels = features(subset, dim, classes, seed=1)
    split = subset * 9 // 10
    out = {"n": subset, "dim": dim, "classes": classes, "cases": []}
    for case, kwargs, gallery in (("leave-one-out", {}, subset), ("gallery-query", {"queries": feats[split:]}, split)):
        g_feats, g_labels = (feats, labels) if case == "leave-one-out" else (feats[:split], labels[:split])
        start = time.perf_counter()
        dense = knn_predictions_dense(g_feats, g_labels, **kwargs)
        dense_s = time.perf_counter() - start
        for rows in (None, 337, 1000):
            block = {} if rows is None else {"block_bytes": 8 * gallery * rows}
            start = time.perf_counter()
            blocked = knn_predictions(g_feats, g_labels, **kwargs, **block)
            out["cases"].append({
                "case": case, "block_rows": rows or "default", "n_predictions": int(len(dense)),
                "differing_predictions": int((blocked != dense).sum()), "identical": bool((blocked == dense).all()),
                "blocked_s": round(time.perf_counter() - start, 2), "dense_s": round(dense_s, 2),
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=45_000)
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--child", choices=["leave-one-out", "gallery-query"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.dim, args.classes, args.gallery)))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    sys.path.insert(0, str(ROOT))
    runs = []
    for case in ("leave-one-out", "gallery-query"):
        cmd = [sys.executable, __file__, "--child", case, "--n", str(args.n), "--dim", str(args.dim),
               "--classes", str(args.classes), "--gallery", str(args.gallery)]
        runs.append(json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout))
        print(f"{case}: {runs[-1]}", file=sys.stderr)
    agree = agreement(args.subset, args.dim, args.classes)
    result = {
        "what": __doc__.splitlines()[0], "command": "python benchmarks/bench_knn.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "runs": runs, "agreement": agree,
        "dense_similarity_gb_at_n": round(8 * args.n * args.n / 1e9, 1),  # what the N x N matrix alone would take (float64)
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_knn.json").write_text(json.dumps(result, indent=2) + "\n")

    print("| protocol | gallery | queries | seconds | peak memory growth | features (float32) | block |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(f"| {r['case']} | {r['n_gallery']:,} | {r['n_queries']:,} | {r['seconds']} | {r['peak_growth_mb']:.0f} MB | "
              f"{r['features_mb']:.0f} MB | {r['block_rows']} rows, {r['block_mb']:.0f} MB |")
    print()
    print(f"| agreement with the dense N x N matrix ({agree['n']:,} images) | block rows | differing predictions |")
    print("| --- | ---: | ---: |")
    for c in agree["cases"]:
        print(f"| {c['case']} ({c['n_predictions']:,} predictions) | {c['block_rows']} | {c['differing_predictions']} |")
    print(f"\nthe dense float64 similarity matrix at {args.n:,} images alone: {result['dense_similarity_gb_at_n']} GB")


if __name__ == "__main__":
    main()
