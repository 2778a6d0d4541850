"""Width pruning on `ref`: mimc's criteria next to Torch-Pruning, fidelity and k-NN on held-out images.

Each row removes the same fraction of every block's MLP neurons (and, for mimc, heads); the
activation criterion calibrates on the training split only. Torch-Pruning (the library peer) runs
its MetaPruner with GroupMagnitudeImportance(p=2) on the fc1 -> fc2 groups, the same widths
(round_to 16). Fidelity: mean pooled cosine to the dense model; k-NN top-1 (k=10) on the held-out
split.

    python benchmarks/ref_width_table.py [--n-calib 128]

Prints a markdown table and writes benchmarks/results/ref_width_table.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ref_nm import RESULTS, evaluate, split


def torch_pruning_mlp(dense, ratio: float):
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    model.manifest = None
    fc1s = [b.mlp.fc1 for b in model.blocks]
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in fc1s] + [model.patch_embed]

    class Pooled(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return self.enc(x).pooled

    x = torch.zeros(1, *dense.config.input_shape)
    pruner = tp.pruner.MetaPruner(Pooled(model), x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=16, unwrapped_parameters=[(model.pos_embed, 2), (model.cls_token, 2)])
    pruner.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "ref_width_table.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    import mimc
    from mimc.compression.registry import compress
    from mimc.compression.width import WidthPruningConfig
    from mimc.data import load_images
    from mimc.models.vit import flops_per_image

    dense = mimc.load(args.model).float()
    images = load_images("builtin", dense.config)
    train_idx, held_idx = split(len(images), 250)
    train, held = images.subset(train_idx), images.subset(held_idx)
    calib = list(train.subset(list(range(args.n_calib))).batches(32))
    rows = [{"method": "dense", "macs_ratio": 1.0, "params_m": round(dense.num_params / 1e6, 3), **evaluate(dense, dense, held), "seconds": 0.0}]
    plans = [("mimc l2", dict(mlp=0.5)), ("mimc activation", dict(mlp=0.5, criterion="activation")),
             ("torch-pruning magnitude", None),
             ("mimc l2", dict(mlp=0.5, heads=0.25)), ("mimc activation", dict(mlp=0.5, heads=0.25, criterion="activation")),
             ("mimc l2", dict(heads=0.5)), ("mimc activation", dict(heads=0.5, criterion="activation"))]
    for name, options in plans:
        start = time.perf_counter()
        if options is None:
            model, label = torch_pruning_mlp(dense, 0.5), f"{name}, mlp 0.5"
            macs = sum(2 * dense.config.num_tokens * dense.config.dim * b.mlp.fc1.out_features for b in model.blocks)
            macs_ratio = (flops_per_image(dense.config) - sum(2 * dense.config.num_tokens * dense.config.dim * dense.config.mlp_dim
                                                               for _ in model.blocks) + macs) / flops_per_image(dense.config)
        else:
            config = WidthPruningConfig(**options)
            model, record = compress(dense, config, calib if config.needs_data else None)
            label = f"{name}, " + ", ".join(f"{k} {v}" for k, v in options.items() if k != "criterion")
            macs_ratio = record.metrics["macs_ratio"]
        seconds = time.perf_counter() - start
        row = {"method": label, "macs_ratio": round(macs_ratio, 4), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
               **evaluate(model, dense, held), "seconds": round(seconds, 2)}
        rows.append(row)
        print(f"  {row}", flush=True)
    print(f"\n{args.model}: width pruning, {len(held)} held-out images, activation criterion calibrated on {args.n_calib} training images\n")
    print("| method | MACs | params M | pooled cosine to dense | SQNR dB | k-NN top-1 | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['macs_ratio']:.3f} | {r['params_m']:.2f} | {r['pooled_cosine']:.4f} | {r['sqnr_db']} | {r['knn_top1']:.3f} | {r['seconds']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "n_held_out": len(held), "n_calib": args.n_calib, "rows": rows,
                               "command": "python benchmarks/ref_width_table.py"}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
