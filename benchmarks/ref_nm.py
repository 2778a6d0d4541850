"""2:4 sparsity on `ref`: fidelity and k-NN of magnitude, Wanda, SparseGPT and learned (MaskLLM) masks.

MaskLLM's central claim is that learned masks beat the best one-shot mask; this checks it on mimc's
reference model. The built-in labelled set is split (seeded) into images the methods may use
(calibration / training, no labels) and held-out images for evaluation (fidelity to the dense
model and leave-one-out k-NN top-1).

    python benchmarks/ref_nm.py [--steps 300] [--threads 1] [--model ref]

Prints a markdown table and writes benchmarks/results/ref_nm.json. Wall times are measured on a
shared, loaded CPU: read them as rough.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def split(n: int, n_train: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def evaluate(model, dense, held) -> dict[str, float]:
    from mimc.evaluation import features, fidelity
    from mimc.metrics import knn_top1

    fid = fidelity(model, dense, held.pixels)
    return {"pooled_cosine": round(fid.pooled_cosine_mean, 5), "sqnr_db": round(fid.sqnr_db, 2),
            "knn_top1": round(knn_top1(features(model, held.pixels), held.labels), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="learned: input masking (DMAE-style), 4x cheaper steps at 0.75")
    parser.add_argument("--prior", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "ref_nm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mimc
    from mimc.compression.registry import compress
    from mimc.compression.nm import NMSparsityConfig
    from mimc.data import load_images
    from mimc.evaluation import features
    from mimc.metrics import knn_top1

    dense = mimc.load(args.model)
    images = load_images("builtin", dense.config)
    train_idx, held_idx = split(len(images), args.n_train)
    train, held = images.subset(train_idx), images.subset(held_idx)
    batches = list(train.batches(64))
    rows = [{"method": "dense", "pooled_cosine": 1.0, "sqnr_db": None,
             "knn_top1": round(knn_top1(features(dense, held.pixels), held.labels), 4), "steps": 0, "seconds": 0.0}]
    runs = [("magnitude", {}), ("wanda", {}), ("sparsegpt (mask only)", {"update_weights": False}),
            ("sparsegpt", {"update_weights": True})]
    learned = {"steps": args.steps, "batch_size": args.batch_size, "mask_ratio": args.mask_ratio}
    if args.prior is not None:
        learned["prior"] = args.prior
    if args.lr is not None:
        learned["lr"] = args.lr
    runs.append(("learned (MaskLLM)", {"learned": learned}))
    for label, extra in runs:
        method = "learned" if label.startswith("learned") else label.split(" ")[0]
        config = NMSparsityConfig(pattern=args.pattern, method=method, n_calib=128, **extra)
        start = time.perf_counter()
        sparse, record = compress(dense, config, batches if method != "magnitude" else None)
        seconds = time.perf_counter() - start
        row = {"method": label, **evaluate(sparse, dense, held), "steps": record.metrics.get("steps", 0),
               "seconds": round(seconds, 1)}
        if method == "learned":
            row["groups_changed_vs_prior"] = record.metrics.get("groups_changed_vs_prior")
            row["steps_per_second"] = record.metrics.get("steps_per_second")
        rows.append(row)
        print(f"  {label}: {row}", flush=True)

    one_shot = [r for r in rows if r["method"] not in ("dense", "learned (MaskLLM)")]
    best = max(one_shot, key=lambda r: r["pooled_cosine"])
    learned_row = rows[-1]
    verdict = {
        "best_one_shot": best["method"],
        "learned_beats_best_one_shot_fidelity": learned_row["pooled_cosine"] > best["pooled_cosine"],
        "learned_minus_best_knn": round(learned_row["knn_top1"] - max(r["knn_top1"] for r in one_shot), 4),
    }
    print(f"\n{args.model}, {args.pattern}, {len(train)} unlabeled training/calibration images, {len(held)} held-out images "
          f"({args.threads} thread(s), shared loaded CPU)\n")
    print("| method | pooled cosine to dense | SQNR dB | k-NN top-1 | steps | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['pooled_cosine']:.4f} | {r['sqnr_db'] if r['sqnr_db'] is not None else '-'} | "
              f"{r['knn_top1']:.3f} | {r['steps']} | {r['seconds']} |")
    print(f"\n{verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "weights_sha256": (getattr(dense, "manifest", None).source or {}).get("sha256"), "pattern": args.pattern, "n_train": len(train), "n_held_out": len(held),
               "threads": args.threads, "note": "wall times measured on a shared CPU under load", "rows": rows, "verdict": verdict,
               "command": "python benchmarks/ref_nm.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
