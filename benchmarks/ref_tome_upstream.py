"""mimc's ``--method tome`` against the published ToMe code itself (facebookresearch/ToMe, tome/merge.py).

Not a test: it needs a local snapshot of the upstream repository (tome/merge.py imports only torch
and math, so it runs here without timm). Upstream's ``ToMeBlock`` (tome/patch/timm.py) is timm
code, so its forward is restated below around mimc's own block submodules: attention with
proportional attention (log size on the logits) and keys averaged over heads as the metric, the
upstream merge between attention and MLP, r clipped by upstream's own ``bipartite_soft_matching``.

    python benchmarks/ref_tome_upstream.py [/path/to/ToMe checkout or bare git dir]

Checks, with and without a cls token:
1. the merge functions chained over 12 blocks of ViT-B-shaped tokens (197 / 196, r=16, metric
   recomputed from the merged tokens each block): same sources per output token (upstream's
   ``merge_source``), same sizes, same token order, token cosine;
2. a ViT-B-shaped random-init encoder, r=16 (clipped by upstream at block 12), prop_attn on and off:
   last hidden state and per-block token counts of mimc's encoder vs upstream's block forward.
Writes benchmarks/results/ref_tome_upstream.json.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimc.models import token_ops  # noqa: E402
from mimc.models.vit import EncoderConfig, build_encoder  # noqa: E402

DEFAULT_SNAPSHOT = "/work/.mirror/facebookresearch+ToMe/repo"
OUT = Path(__file__).resolve().parent / "results" / "ref_tome_upstream.json"


def load_upstream(snapshot: str):
    """Import upstream tome/merge.py from a checkout or a bare git directory (HEAD)."""
    root = Path(snapshot)
    source = root / "tome" / "merge.py"
    if not source.exists():
        text = subprocess.run(["git", "-C", snapshot, "show", "HEAD:tome/merge.py"], check=True, capture_output=True, text=True).stdout
        source = Path(tempfile.mkdtemp()) / "tome_merge_upstream.py"
        source.write_text(text)
    spec = importlib.util.spec_from_file_location("tome_merge_upstream", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def chained_merges(up, cls: bool, blocks: int = 12, r: int = 16, batch: int = 4, dim: int = 64) -> dict:
    g = torch.Generator().manual_seed(1 + cls)
    n = 196 + cls
    x = torch.randn(batch, n, dim, generator=g)
    projections = [torch.randn(dim, 32, generator=g) for _ in range(blocks)]
    ux, us, usrc = x, None, None
    mx, ms = x, torch.ones(batch, n, 1)
    msrc = torch.eye(n).expand(batch, n, n)
    worst, counts, same_sources = 1.0, [n], True
    for i in range(blocks):
        merge, _ = up.bipartite_soft_matching(ux @ projections[i], r, class_token=cls)
        usrc = up.merge_source(merge, ux, usrc)
        ux, us = up.merge_wavg(merge, ux, us)
        step = token_ops.clip_r(r, mx.shape[1], int(cls))
        s = token_ops.bipartite_assignment(mx @ projections[i], step, int(cls))
        msrc = (s @ token_ops.split_ab(msrc) > 0).float()
        mx, ms = token_ops.merge_weighted(token_ops.split_ab(mx), token_ops.split_ab(ms), s)
        counts.append(mx.shape[1])
        same_sources &= torch.equal(msrc, usrc) and torch.equal(ms, us)
        worst = min(worst, cosine_min(mx, ux))
    return {"cls": cls, "tokens_per_block": counts, "same_sources_sizes_order": same_sources, "min_token_cosine": worst}


def upstream_forward(enc, up, pixels: torch.Tensor, r: int, prop_attn: bool) -> tuple[torch.Tensor, list[int]]:
    """tome/patch/timm.py ``ToMeBlock.forward`` on mimc's block submodules, with upstream's merge."""
    cls = enc.config.cls_token
    x, size, counts = enc.embed(pixels), None, []
    counts.append(x.shape[1])
    for block in enc.blocks:
        bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
        out, metric, _ = block.attn(block.norm1(x), bias, return_keys=True)
        x = x + block.ls1(out)
        merge, _ = up.bipartite_soft_matching(metric, r, class_token=cls)
        x, size = up.merge_wavg(merge, x, size)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        counts.append(x.shape[1])
    return enc.norm(x), counts


def encoder_check(up, cls: bool, prop_attn: bool, r: int = 16) -> dict:
    cfg = EncoderConfig(image_size=224, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072, cls_token=cls,
                        pooling="cls" if cls else "mean", family="mae")
    dense = build_encoder(cfg, seed=0)
    schedule = {"method": "tome", "r": token_ops.tome_r_list(cfg.depth, r), "prop_attn": prop_attn}
    enc = build_encoder(cfg.replace(token_schedule=schedule), seed=0)
    enc.load_state_dict(dense.state_dict())
    enc.eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, counts = upstream_forward(enc, up, pixels, r, prop_attn)
        got = enc(pixels).last_hidden_state
    return {
        "cls": cls,
        "prop_attn": prop_attn,
        "tokens_per_block": enc.token_plan.counts,
        "upstream_tokens_per_block": counts,
        "r_per_block": enc.token_plan.merge_r,
        "min_token_cosine": cosine_min(got, ref),
        "max_abs_diff": float((got - ref).abs().max()),
    }


def main() -> None:
    up = load_upstream(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SNAPSHOT)
    torch.set_num_threads(2)
    results = {
        "chained_merges": [chained_merges(up, cls) for cls in (True, False)],
        "encoder_vitb_r16": [encoder_check(up, cls, prop) for cls in (True, False) for prop in (False, True)],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per check: the lists stay readable.
    text = "{\n" + ",\n".join(
        f'  "{name}": [\n' + ",\n".join("    " + json.dumps(row) for row in rows) + "\n  ]" for name, rows in results.items()
    ) + "\n}\n"
    OUT.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
