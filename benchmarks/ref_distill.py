"""Recovery on `ref` after 50 % block pruning: k-NN before and after label-free distillation.

Prunes half of ref's blocks (data-free, BlockPruningConfig(ratio=0.5)), then distills the dense
model's features into the pruned one on unlabeled images — once with DMAE-style input masking
(75 % of patches hidden) and once without, the same number of steps — and reports k-NN top-1 and
fidelity on held-out images, wall time, and the per-step speed-up from masking. The claim checked:
distillation recovers at least half of the k-NN drop.

    python benchmarks/ref_distill.py [--steps 400] [--criterion entropy] [--threads 1]
    python benchmarks/ref_distill.py --tokens-keep 0.5 --out benchmarks/results/ref_distill_stack.json
        # the stacked recipe (half the blocks + half the patches, examples/ref-cpu.yaml's model
        # stages), whose k-NN does drop; a token-dropped student needs every kept token, so only
        # the unmasked run applies there

Prints a markdown table and writes benchmarks/results/ref_distill.json. Wall times are measured on
a shared, loaded CPU: read them as rough.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ref_nm import RESULTS, evaluate, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--full-steps", type=int, default=None, help="steps of the unmasked run (default --steps; fewer to only time it)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--criterion", default="entropy")
    parser.add_argument("--n-train", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens-keep", type=float, default=None, help="also drop patches (MAE-native grid) before distilling")
    parser.add_argument("--out", default=str(RESULTS / "ref_distill.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mimc
    from mimc.compression.registry import compress
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.distill import DistillConfig
    from mimc.data import load_images
    from mimc.train import TrainRun

    dense = mimc.load(args.model)
    images = load_images("builtin", dense.config)
    train_idx, held_idx = split(len(images), args.n_train)
    train, held = images.subset(train_idx), images.subset(held_idx)
    pruned, prune_record = compress(dense, BlockPruningConfig(ratio=0.5, criterion=args.criterion))
    label = f"pruned 50% ({args.criterion}; removed {prune_record.metrics.get('removed_blocks')})"
    if args.tokens_keep is not None:
        from mimc.compression.tokens import TokenReductionConfig

        pruned, _ = compress(pruned, TokenReductionConfig(method="drop", keep=args.tokens_keep))
        label += f" + patches kept {args.tokens_keep:.0%} (grid)"
    rows = [{"model": "dense", **evaluate(dense, dense, held), "steps": 0, "seconds": 0.0},
            {"model": label, **evaluate(pruned, dense, held), "steps": 0, "seconds": 0.0}]
    for mask_ratio in ((0.0,) if args.tokens_keep is not None else (0.75, 0.0)):
        steps = args.steps if mask_ratio > 0 or args.full_steps is None else args.full_steps
        config = DistillConfig(steps=steps, lr=args.lr, batch_size=args.batch_size, mask_ratio=mask_ratio)
        start = time.perf_counter()
        healed, record = compress(pruned, config, list(train.batches(64)), run=TrainRun(teacher=dense))
        seconds = time.perf_counter() - start
        row = {"model": f"pruned + distill (mask {mask_ratio})", **evaluate(healed, dense, held), "steps": steps,
               "seconds": round(seconds, 1), "steps_per_second": record.metrics["steps_per_second"]}
        rows.append(row)
        print(f"  {row}", flush=True)

    base, drop_to = rows[0]["knn_top1"], rows[1]["knn_top1"]
    drop = base - drop_to
    recovery = {r["model"]: (round((r["knn_top1"] - drop_to) / drop, 3) if drop > 0 else None) for r in rows[2:]}
    masked, full = rows[2], rows[-1]
    summary = {
        "knn_drop_from_pruning": round(drop, 4),
        "fraction_of_drop_recovered": recovery,
        "recovers_at_least_half": {k: (v is not None and v >= 0.5) for k, v in recovery.items()},
        # k-NN is only meaningful when the dense model's k-NN is; fidelity to dense always is.
        "fraction_of_fidelity_gap_closed": {r["model"]: round((r["pooled_cosine"] - rows[1]["pooled_cosine"]) / (1.0 - rows[1]["pooled_cosine"]), 4)
                                            for r in rows[2:]},
        "per_step_speedup_from_masking": round(masked["steps_per_second"] / full["steps_per_second"], 2) if masked is not full else None,
    }
    print(f"\n{args.model}: {label}, distilled on {len(train)} unlabeled images, evaluated on {len(held)} "
          f"held-out images ({args.threads} thread(s), shared loaded CPU)\n")
    print("| model | k-NN top-1 | pooled cosine to dense | SQNR dB | steps | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['knn_top1']:.3f} | {r['pooled_cosine']:.4f} | {r['sqnr_db']} | {r['steps']} | {r['seconds']} |")
    print(f"\n{summary}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "weights_sha256": (getattr(dense, "manifest", None).source or {}).get("sha256"), "n_train": len(train), "n_held_out": len(held), "threads": args.threads,
               "note": "wall times measured on a shared CPU under load", "rows": rows, "summary": summary,
               "command": "python benchmarks/ref_distill.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
