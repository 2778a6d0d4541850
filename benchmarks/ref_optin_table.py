"""OPTIN (one-shot width under a MAC budget) against uniform and globally allocated l2 / activation widths.

At two MAC ratios, the ratio of uniform `activation` MLP -50 % (x0.693 on `ref`) and x0.6, each row
prunes the dense model once, without retraining:
- uniform l2 / activation: every block loses the same fraction of MLP neurons (the fraction that
  lands nearest the ratio, in 16-neuron steps);
- Torch-Pruning magnitude at that same uniform width (the library peer);
- global l2 / activation / optin: `--macs R`, heads and neurons allocated per block
  (mimc.compression.optin).
Fidelity on held-out images: pooled cosine and SQNR to the dense model, leave-one-out k-NN top-1.
Latency: the OPTIN model against the uniform activation one at equal MACs, both exported to ONNX
and timed interleaved (runtime/timing.py interleave) on this (shared, loaded) CPU.

    python benchmarks/ref_optin_table.py [--model ref] [--optin-images 8]
    python benchmarks/ref_optin_table.py --model hf-random   # a random small transformers ViT, save_pretrained

Prints markdown tables and writes benchmarks/results/<model>_optin_table.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ref_nm import RESULTS, evaluate, split
from ref_width_table import torch_pruning_mlp


def random_hf_vit(out: Path) -> str:
    """A random ViT-shaped transformers model (ref's geometry, 6 blocks) written with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                                 image_size=32, patch_size=4, initializer_range=0.1)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(out)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def uniform_fraction(dense, ratio: float) -> float:
    """The uniform MLP fraction (16-neuron steps) whose MACs land nearest ``ratio``."""
    from mimc.compression.width import WidthPruningConfig
    from mimc.models.vit import flops_per_image

    base, width, best = flops_per_image(dense.config), dense.config.mlp_dim, None
    for k in range(1, width // 16):
        frac = 1 - 16 * k / width
        cfg = WidthPruningConfig(mlp=frac)
        macs = flops_per_image(dense.config.replace(block_mlp_dims=[cfg.kept_mlp(width)] * dense.config.depth)) / base
        if best is None or abs(macs - ratio) < abs(best[1] - ratio):
            best = (frac, macs)
    return round(best[0], 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--optin-images", type=int, default=8, help="OPTIN's scoring batch (the paper: 128; CPU time grows linearly)")
    parser.add_argument("--ratios", default="uniform,0.6")
    parser.add_argument("--latency-iters", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import mimc
    from mimc.compression import width as width_mod
    from mimc.compression.registry import compress
    from mimc.compression.width import WidthPruningConfig
    from mimc.data import load_images
    from mimc.deploy.onnx import export_onnx
    from mimc.runtime.ort import runner
    from mimc.runtime.timing import interleave

    tmp = Path(tempfile.mkdtemp(prefix="optin-bench-"))
    source = random_hf_vit(tmp / "hf") if args.model == "hf-random" else args.model
    dense = mimc.load(source).float()
    images = load_images("builtin", dense.config)
    train_idx, held_idx = split(len(images), 250)
    train, held = images.subset(train_idx), images.subset(held_idx)
    calib = list(train.subset(list(range(args.n_calib))).batches(32))

    # Scores depend on the model and the criterion only: compute each once for every ratio.
    cache, scorer = {}, width_mod._scores

    def cached_scores(encoder, config, batches):
        key = config.criterion
        if key == "optin":
            key = f"optin-{config.optin_trajectory}"
        if key not in cache:
            start = time.perf_counter()
            cache[key] = scorer(encoder, config, batches)
            print(f"  scored {key} in {time.perf_counter() - start:.0f} s", flush=True)
            torch.save(cache[key], tmp / f"scores_{key}.pt")  # for ablations without re-scoring
            print(f"  saved {tmp / f'scores_{key}.pt'}", flush=True)
        return cache[key]

    width_mod._scores = cached_scores
    # One OPTIN pass gives the terms of both trajectories (optin_terms), so the ablation costs nothing extra.
    from mimc.compression import optin as optin_mod

    terms_cache, terms_fn = {}, optin_mod.optin_terms

    def cached_terms(enc, batches, seed=0):
        if seed not in terms_cache:
            terms_cache[seed] = terms_fn(enc, batches, seed)
        return terms_cache[seed]

    optin_mod.optin_terms = cached_terms
    rows = [{"ratio": "dense", "method": "dense", "macs_ratio": 1.0, **evaluate(dense, dense, held), "mlp_dims": None, "heads": None}]
    models = {}
    for ratio_name in args.ratios.split(","):
        if ratio_name == "uniform":
            _, rec = compress(dense, WidthPruningConfig(mlp=0.5, criterion="activation"), calib)
            ratio = rec.metrics["macs_ratio"]
        else:
            ratio = float(ratio_name)
        frac = uniform_fraction(dense, ratio)
        plans = [(f"uniform l2 (mlp {frac})", WidthPruningConfig(mlp=frac)),
                 (f"uniform activation (mlp {frac})", WidthPruningConfig(mlp=frac, criterion="activation")),
                 (f"torch-pruning magnitude (mlp {frac})", None),
                 ("global l2 --macs", WidthPruningConfig(macs=ratio)),
                 ("global activation --macs", WidthPruningConfig(macs=ratio, criterion="activation")),
                 ("optin --macs", WidthPruningConfig(macs=ratio, criterion="optin", optin_images=args.optin_images)),
                 ("optin, final-block trajectory (ablation)", WidthPruningConfig(macs=ratio, criterion="optin", optin_images=args.optin_images,
                                                                                optin_trajectory="final"))]
        for label, config in plans:
            if config is None:
                model = torch_pruning_mlp(dense, frac)
                mlp_dims, heads = [b.mlp.fc1.out_features for b in model.blocks], [dense.config.num_heads] * dense.config.depth
                from mimc.models.vit import flops_per_image

                macs = flops_per_image(dense.config.replace(block_mlp_dims=mlp_dims)) / flops_per_image(dense.config)
            else:
                model, rec = compress(dense, config, calib)
                mlp_dims, heads, macs = rec.metrics["mlp_dims"], rec.metrics["heads"], rec.metrics["macs_ratio"]
            row = {"ratio": round(ratio, 4), "method": label, "macs_ratio": round(macs, 4), **evaluate(model, dense, held),
                   "mlp_dims": mlp_dims, "heads": heads}
            rows.append(row)
            models[(row["ratio"], label.split(" (")[0])] = model
            print(f"  {row}", flush=True)
    # Latency at equal MACs: optin against uniform activation, per ratio.
    latency = []
    for r in sorted({row["ratio"] for row in rows if row["ratio"] != "dense"}):
        paths = []
        for name in ("uniform activation", "optin --macs"):
            path = tmp / f"{name.split()[0]}-{r}.onnx"
            export_onnx(models[(r, name)], path, batch=1)
            paths.append(path)
        ms = interleave([runner(p, 1) for p in paths], iters=args.latency_iters)
        latency.append({"ratio": r, "uniform_activation_ms": ms[0], "optin_ms": ms[1], "optin_over_uniform": round(ms[1] / ms[0], 3)})
    name = "ref" if args.model == "ref" else ("hf_random" if args.model == "hf-random" else Path(args.model).name)
    print(f"\n{args.model}: width at equal MACs, {len(held)} held-out images; activation calibrated on {args.n_calib} "
          f"training images, OPTIN scored on {args.optin_images}\n")
    print("| MAC target | method | MACs | pooled cosine | SQNR dB | k-NN top-1 | MLP widths per block | heads per block |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['ratio']} | {r['method']} | {r['macs_ratio']:.3f} | {r['pooled_cosine']:.4f} | {r['sqnr_db']} | {r['knn_top1']:.3f} | "
              f"{r['mlp_dims'] or ''} | {r['heads'] or ''} |")
    print("\n| MAC target | uniform activation ms | OPTIN ms | OPTIN / uniform |\n| ---: | ---: | ---: | ---: |")
    for lat in latency:
        print(f"| {lat['ratio']} | {lat['uniform_activation_ms']} | {lat['optin_ms']} | {lat['optin_over_uniform']} |")
    out = Path(args.out or RESULTS / f"{name}_optin_table.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "n_held_out": len(held), "n_calib": args.n_calib, "optin_images": args.optin_images,
                               "rows": rows, "latency": latency, "latency_note": "ORT CPU, 1 thread, batch 1, interleaved, shared loaded machine",
                               "command": f"python benchmarks/ref_optin_table.py --model {args.model} --optin-images {args.optin_images}"},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
