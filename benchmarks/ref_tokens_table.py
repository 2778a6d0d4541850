"""Fidelity and k-NN accuracy per token-reduction method and keep rate, on ``ref`` and a tiny VideoMAE.

- ``ref`` (mimc's shipped MAE, 32 px, 8x8 patches, 12 blocks) on the built-in labelled images:
  pooled-feature cosine to the dense model, and leave-one-out k-NN top-1 (mimc.metrics.knn_top1)
  of the reduced model vs the dense one.
- A tiny random-init VideoMAE (transformers VideoMAEConfig -> save_pretrained -> mimc.load, so the
  converter is exercised): fidelity only (random weights have no accuracy to keep), on seeded
  inputs (mimc.data.deterministic_inputs).

    /work/venv/bin/python benchmarks/ref_tokens_table.py

Writes benchmarks/results/ref_tokens.md (and .json beside it).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimc.compression.registry import compress  # noqa: E402
from mimc.compression.tokens import TokenReductionConfig  # noqa: E402
from mimc.data import deterministic_inputs, load_images  # noqa: E402
from mimc.evaluation import features, fidelity  # noqa: E402
from mimc.metrics import knn_top1  # noqa: E402
from mimc.models.resolve import load_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ref_tokens.md"

REF_SETTINGS = [
    ("tome", "r=1", TokenReductionConfig(method="tome", r=1)),
    ("tome", "r=2", TokenReductionConfig(method="tome", r=2)),
    ("tome", "r=3", TokenReductionConfig(method="tome", r=3)),
    ("tome", "r=4", TokenReductionConfig(method="tome", r=4)),
    ("topk", "keep 0.7 at 4,7,10, fuse", TokenReductionConfig(method="topk", keep=0.7)),
    ("topk", "keep 0.5 at 4,7,10, fuse", TokenReductionConfig(method="topk", keep=0.5)),
    ("topk", "keep 0.5 at 4,7,10, no fuse", TokenReductionConfig(method="topk", keep=0.5, fuse=False)),
    ("drop", "keep 0.75 grid", TokenReductionConfig(method="drop", keep=0.75)),
    ("drop", "keep 0.5 grid", TokenReductionConfig(method="drop", keep=0.5)),
    ("drop", "keep 0.25 grid", TokenReductionConfig(method="drop", keep=0.25)),
    ("drop", "keep 0.5 variance", TokenReductionConfig(method="drop", keep=0.5, pattern="variance")),
    ("drop", "keep 0.25 variance", TokenReductionConfig(method="drop", keep=0.25, pattern="variance")),
]

VIDEO_SETTINGS = [
    ("tome", "r=2", TokenReductionConfig(method="tome", r=2)),
    ("tome", "r=4", TokenReductionConfig(method="tome", r=4)),
    ("topk", "keep 0.5 at 1,2,3, fuse", TokenReductionConfig(method="topk", keep=0.5)),
    ("drop", "keep 0.5 tube grid", TokenReductionConfig(method="drop", keep=0.5)),
    ("drop", "keep 0.25 tube grid", TokenReductionConfig(method="drop", keep=0.25)),
    ("drop", "keep 0.5 variance", TokenReductionConfig(method="drop", keep=0.5, pattern="variance")),
]


def tiny_videomae(tmp: Path):
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64,
                            num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    VideoMAEModel(config).eval().save_pretrained(tmp / "videomae")
    return load_model(str(tmp / "videomae"))


def pooled_cosine(feats: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-image cosine of pooled features (as mimc.evaluation.fidelity reports it), mean and min."""
    cos = torch.nn.functional.cosine_similarity(feats.double(), reference.double(), dim=-1)
    return {"pooled_cosine_mean": float(cos.mean()), "pooled_cosine_min": float(cos.min())}


def ref_rows() -> list[dict]:
    dense = load_model("ref")
    images = load_images("builtin", dense.config)
    dense_feats = features(dense, images)  # computed once; every row compares against it
    dense_knn = knn_top1(dense_feats, images.labels)
    rows = [{"model": "ref", "method": "dense", "setting": "-", "tokens_per_block": [dense.config.num_tokens] * 13,
             "macs_ratio": 1.0, "pooled_cosine": 1.0, "knn_top1": dense_knn, "knn_retained": 1.0}]
    for method, setting, cfg in REF_SETTINGS:
        enc, rec = compress(dense, cfg)
        feats = features(enc, images)
        fid = pooled_cosine(feats, dense_feats)
        knn = knn_top1(feats, images.labels)
        rows.append({"model": "ref", "method": method, "setting": setting, "tokens_per_block": rec.metrics["tokens_per_block"],
                     "macs_ratio": rec.metrics["macs_ratio"], "pooled_cosine": fid["pooled_cosine_mean"],
                     "pooled_cosine_min": fid["pooled_cosine_min"], "knn_top1": knn, "knn_retained": knn / dense_knn})
        print(f"ref {method} {setting}: cos {fid['pooled_cosine_mean']:.4f} knn {knn:.3f}", file=sys.stderr)
    return rows, len(images)


def video_rows() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        dense = tiny_videomae(Path(tmp))
    x = deterministic_inputs(dense.config, batch=32, seed=0)
    rows = [{"model": "tiny VideoMAE (random init)", "method": "dense", "setting": "-", "tokens_per_block": [dense.config.num_tokens] * 5,
             "macs_ratio": 1.0, "pooled_cosine": 1.0, "knn_top1": None, "knn_retained": None}]
    for method, setting, cfg in VIDEO_SETTINGS:
        enc, rec = compress(dense, cfg)
        fid = fidelity(enc, dense, x).to_dict()
        rows.append({"model": "tiny VideoMAE (random init)", "method": method, "setting": setting,
                     "tokens_per_block": rec.metrics["tokens_per_block"], "macs_ratio": rec.metrics["macs_ratio"],
                     "pooled_cosine": fid["pooled_cosine_mean"], "pooled_cosine_min": fid["pooled_cosine_min"],
                     "knn_top1": None, "knn_retained": None})
    return rows


def ref_provenance() -> str:
    """Which ``ref`` weights the numbers belong to (they are retrained from time to time)."""
    from mimc.artifact import sha256_file
    from mimc.models.reference import REF_LOG, REF_WEIGHTS

    steps = "?"
    if REF_LOG.is_file():
        log = json.loads(REF_LOG.read_text())
        steps = log.get("steps_done", log.get("settings", {}).get("steps", "?"))
    return f"`ref` weights: sha256 {sha256_file(REF_WEIGHTS)[:12]}, {steps} MAE training steps (mimc/models/ref/train_log.json)."


def main() -> None:
    ref, n_images = ref_rows()
    video = video_rows()
    lines = [
        "# Token reduction: fidelity and k-NN per method and keep rate",
        "",
        f"Written by `benchmarks/ref_tokens_table.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. No retraining: off-the-shelf",
        f"weights, static schedules. `ref`: {n_images} built-in labelled images, leave-one-out weighted k-NN (k=10) on pooled features.",
        "Tiny VideoMAE: random init (4 blocks, 2x4x4 tubes), fidelity on 32 seeded inputs; k-NN is meaningless for random weights.",
        "MACs: linears + attention matmuls with the per-block token counts, relative to dense.",
        ref_provenance(),
        "",
        "| model | method | setting | tokens entering each block (then final) | MACs vs dense | pooled cosine (mean / min) | k-NN top-1 | k-NN retained |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ref + video:
        cos = "1" if r["method"] == "dense" else f"{r['pooled_cosine']:.4f} / {r['pooled_cosine_min']:.4f}"
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.3f}"
        kept = "-" if r["knn_retained"] is None else f"{r['knn_retained']:.3f}"
        counts = r["tokens_per_block"]
        counts_text = f"{counts[0]}" if len(set(counts)) == 1 else " > ".join(str(c) for c in counts)
        lines.append(f"| {r['model']} | {r['method']} | {r['setting']} | {counts_text} | {r['macs_ratio']:.3f} | {cos} | {knn} | {kept} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps({"rows": ref + video}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
