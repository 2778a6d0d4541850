"""Peak memory of `mimc eval` on 2 000 vs 20 000 JPEGs: streamed images, memory that does not grow with the set.

The same ViT-Ti/16-shaped graph (224 px, dim 192, 12 blocks, random weights, static batch B) and the
same cached folder of random 224-px JPEGs in ten class folders as ``bench_embed.py``. For each size K,
a fresh ``python`` parent runs ``mimc eval GRAPH --data FOLDER --n K --json`` (leave-one-out k-NN
over the K images; decoding in DataLoader workers) and reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``:
the largest resident set of any process of the run (the main process or one decoding worker).
Goal: the 20 000 run's peak <= 1.2 x the 2 000 run's, and < 2 GB. Held in memory on the old path
(every image in one tensor), 20 000 images at 224 px would be 12 GB of float32 before any copy.

    python benchmarks/bench_eval_rss.py [--sizes 2000 20000 --batch 16]

Writes benchmarks/results/bench_eval_rss.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import CACHE, build_graph, make_jpegs  # noqa: E402

RESULTS = Path(__file__).parent / "results"

PARENT = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-2000:],
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def peak_eval(graph: Path, data: Path, n: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "mimc", "eval", str(graph), "--data", str(data), "--n", str(n), "--batch-size", str(batch), "--json"]
    start = time.perf_counter()
    out = json.loads(subprocess.run([sys.executable, "-c", PARENT, *cmd], capture_output=True, text=True, check=True).stdout)
    if out["rc"] != 0:
        raise SystemExit(f"mimc eval failed ({out['rc']}): {out['stderr']}")
    report = json.loads(out["stdout"])
    return {"images": report["data"]["n_images"], "knn_top1": report.get("knn_top1"), "peak_rss_mb": round(out["peak_rss_kb"] / 1024, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    images = CACHE / "images"
    make_jpegs(images, max(args.sizes))
    graph = build_graph(CACHE, args.batch)
    rows = [{"n": n, **peak_eval(graph, images, n, args.batch)} for n in args.sizes]
    small, big = rows[0], rows[-1]
    summary = {"rows": rows, "ratio_largest_to_smallest": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
               "command": "python benchmarks/bench_eval_rss.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_eval_rss.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| images | peak RSS (MB) | seconds | k-NN top-1 (random weights) |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['images']} | {r['peak_rss_mb']} | {r['seconds']} | {r['knn_top1']:.3f} |")
    print(f"peak at {big['n']} / peak at {small['n']}: {summary['ratio_largest_to_smallest']}")


if __name__ == "__main__":
    main()
