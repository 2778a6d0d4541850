"""RSQ token weighting for 2:4 sparsity: SparseGPT and Wanda with and without it, and learned masks from each prior.

RSQ (arXiv 2503.01820) weights every calibration token by the attention it receives when the
second-order statistics are accumulated (mimc.compression.rsq). Each pair of rows differs only in
``weighting``; calibration on the training split (no labels), fidelity (pooled cosine and SQNR to
the dense model) and leave-one-out k-NN top-1 on held-out images.

    python benchmarks/ref_rsq_table.py [--model ref|hf-random] [--r-min 0.333] [--steps 100]

Prints a markdown table and writes benchmarks/results/<model>_rsq_table.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ref_nm import RESULTS, evaluate, split
from ref_optin_table import random_hf_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--r-min", type=float, default=1 / 3)
    parser.add_argument("--steps", type=int, default=100, help="learned masks: training steps (0 skips the learned rows)")
    parser.add_argument("--n-train", type=int, default=250)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import mimc
    from mimc.compression.nm import NMSparsityConfig
    from mimc.compression.registry import compress
    from mimc.data import load_images

    source = random_hf_vit(Path(tempfile.mkdtemp(prefix="rsq-bench-")) / "hf") if args.model == "hf-random" else args.model
    dense = mimc.load(source).float()
    images = load_images("builtin", dense.config)
    train_idx, held_idx = split(len(images), args.n_train)
    train, held = images.subset(train_idx), images.subset(held_idx)
    batches = list(train.batches(64))
    rows = [{"method": "dense", "weighting": "-", **evaluate(dense, dense, held), "seconds": 0.0}]
    runs = [("wanda", {}), ("sparsegpt", {"update_weights": True})]
    if args.steps:
        runs.append(("learned, sparsegpt prior", {"learned": {"steps": args.steps, "batch_size": 32, "mask_ratio": 0.75, "prior": "sparsegpt"}}))
    for label, extra in runs:
        method = "learned" if label.startswith("learned") else label
        for weighting in ("uniform", "rsq"):
            rsq = {"weighting": "rsq", "r_min": args.r_min} if weighting == "rsq" else {}  # r_min does nothing with uniform
            config = NMSparsityConfig(pattern=args.pattern, method=method, n_calib=128, **rsq, **extra)
            start = time.perf_counter()
            sparse, record = compress(dense, config, batches)
            row = {"method": label, "weighting": weighting, **evaluate(sparse, dense, held), "seconds": round(time.perf_counter() - start, 1)}
            if method == "learned":
                row["prior_cosine_calib"] = record.metrics.get("prior_fidelity_calib")
            rows.append(row)
            print(f"  {row}", flush=True)
    print(f"\n{args.model}: {args.pattern} with and without RSQ token weighting (r_min {args.r_min:.3f}), {len(held)} held-out images\n")
    print("| method | weighting | pooled cosine | SQNR dB | k-NN top-1 | s |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['weighting']} | {r['pooled_cosine']:.4f} | {r['sqnr_db']} | {r['knn_top1']:.3f} | {r['seconds']} |")
    name = args.model.replace("-", "_") if args.model in ("ref", "hf-random") else Path(args.model).name
    out = Path(args.out or RESULTS / f"{name}_rsq_table.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "pattern": args.pattern, "r_min": args.r_min, "steps": args.steps, "rows": rows,
                               "command": f"python benchmarks/ref_rsq_table.py --model {args.model} --steps {args.steps}"}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
