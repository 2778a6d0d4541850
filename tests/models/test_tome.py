"""``--method tome`` is ToMe as published (facebookresearch/ToMe, tome/merge.py and tome/patch/timm.py).

The reference below is written from upstream's description, item by item in plain Python, not from
mimc's tensor code: tokens alternate A/B over the WHOLE sequence (the cls token is A's first and is
never merged), each unprotected A token's edge is its best cosine match in B, the r strongest edges
merge (size-weighted mean), the output is [unmerged A, all B] with the unmerged A tokens in edge
order, re-sorted by position only when there is a cls token, and r is clipped per block to
(t - protected) // 2. benchmarks/ref_tome_upstream.py compares against upstream's own code.
"""
import math

import pytest
import torch

from mimc.compression.tokens import TokenReductionConfig
from mimc.errors import ConfigError
from mimc.models import token_ops
from mimc.models.vit import Encoder, EncoderConfig, build_encoder
from tests.conftest import tiny_config, tiny_video_config


def reference_tome(x, sizes, sources, metric, r, cls):
    """One ToMe merge of one image: x (N, C), sizes [N], sources [N sets], metric (N, K)."""
    n = x.shape[0]
    r = min(r, (n - int(cls)) // 2)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    edges = []  # (score, A position, best B position)
    for pa in a_pos[1:] if cls else a_pos:
        cos = [float(unit[pa] @ unit[pb]) for pb in b_pos]
        best = max(range(len(b_pos)), key=lambda j: cos[j])
        edges.append((cos[best], pa, b_pos[best]))
    edges.sort(key=lambda e: -e[0])
    merged, unmerged = edges[:r], [e[1] for e in edges[r:]]
    if cls:
        unmerged = [0] + sorted(unmerged)
    groups = [[p] for p in unmerged] + [[pb] + [pa for _, pa, dst in merged if dst == pb] for pb in b_pos]
    out = torch.stack([sum(sizes[p] * x[p] for p in g) / sum(sizes[p] for p in g) for g in groups])
    return out, [sum(sizes[p] for p in g) for g in groups], [set().union(*(sources[p] for p in g)) for g in groups]


def mimc_sources(x, sizes, metric, r, prefix, sources):
    """mimc's merge of x/sizes plus its sources (the one-hot assignment applied to a membership matrix)."""
    s = token_ops.bipartite_assignment(metric, r, prefix)
    out, out_sizes = token_ops.merge_weighted(token_ops.split_ab(x), token_ops.split_ab(sizes), s)
    return out, out_sizes, (s @ token_ops.split_ab(sources) > 0).float()


def angles(*degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# 1. Golden: merges worked out by hand ------------------------------------------------------------
def test_golden_merge_with_cls_splits_over_the_whole_sequence():
    # Positions 0..6: cls, then B = {1, 3, 5} at 0°, 90°, 180°; A = {2, 4, 6} at 300°, 100°, 200°.
    # Edges: 2->1 cos 60° = 0.50, 4->3 cos 10° = 0.98, 6->5 cos 20° = 0.94. The cls token (0°) would
    # match 1 perfectly but is protected. r=2 merges 4 into 3 and 6 into 5.
    metric = angles(0, 0, 300, 90, 100, 180, 200)[None]
    x = torch.eye(7)[None] * 12.0
    sizes = torch.tensor([1.0, 1, 1, 1, 2, 3, 1])[None, :, None]
    out, out_sizes = token_ops.tome_merge(x, sizes, metric, r=2, prefix=1)
    # Output: unmerged A by position (cls first) = [0, 2], then B = [1, 3+4, 5+6].
    expected = torch.zeros(5, 7)
    expected[0, 0] = expected[1, 2] = expected[2, 1] = 12.0
    expected[3, 3], expected[3, 4] = 12.0 / 3, 24.0 / 3  # sizes 1 and 2
    expected[4, 5], expected[4, 6] = 36.0 / 4, 12.0 / 4  # sizes 3 and 1
    assert torch.equal(out[0], expected)
    assert out_sizes[0, :, 0].tolist() == [1, 1, 1, 3, 4]


@pytest.mark.parametrize("r,order,out_sizes", [(1, [[4], [0], [1], [2, 3], [5]], [1, 1, 1, 2, 1]), (2, [[0], [1], [2, 3], [4, 5]], [1, 1, 2, 2])])
def test_golden_merge_without_cls_keeps_unmerged_in_edge_order(r, order, out_sizes):
    # Positions 0..5: A = {0, 2, 4} at 300°, 100°, 200°; B = {1, 3, 5} at 0°, 90°, 180°.
    # Edge order: 2 (0.98), 4 (0.94), 0 (0.50). With r=1 the unmerged A tokens stay in that order,
    # [4, 0], not by position.
    metric = angles(300, 0, 100, 90, 200, 180)[None]
    out, sizes = token_ops.tome_merge(torch.eye(6)[None], torch.ones(1, 6, 1), metric, r=r, prefix=0)
    assert [torch.nonzero(row).flatten().tolist() for row in out[0]] == order
    assert sizes[0, :, 0].tolist() == out_sizes


# 2. Equivalence to the independent reference ----------------------------------------------------
@pytest.mark.parametrize("cls,n,r,blocks", [(True, 17, 3, 4), (False, 16, 3, 4), (True, 65, 16, 6), (False, 64, 12, 6), (True, 17, 8, 4)])
def test_chained_merges_equal_the_reference(cls, n, r, blocks):
    """Several blocks in a row: the metric of each block comes from the merged tokens, so any
    difference in token order would change the next split."""
    g = torch.Generator().manual_seed(n + r + cls)
    batch, c = 3, 12
    x = torch.randn(batch, n, c, generator=g)
    projections = [torch.randn(c, 6, generator=g) for _ in range(blocks)]
    mx, ms, msrc = x, torch.ones(batch, n, 1), torch.eye(n).expand(batch, n, n)
    refs = [(x[i], [1.0] * n, [{p} for p in range(n)]) for i in range(batch)]
    for proj in projections:
        step = token_ops.clip_r(r, mx.shape[1], int(cls))
        mx, ms, msrc = mimc_sources(mx, ms, mx @ proj, step, int(cls), msrc)
        refs = [reference_tome(rx, rs, rsrc, rx @ proj, r, cls) for rx, rs, rsrc in refs]
        for i, (rx, rs, rsrc) in enumerate(refs):
            assert [set(torch.nonzero(row).flatten().tolist()) for row in msrc[i]] == rsrc
            assert ms[i, :, 0].tolist() == rs
            assert torch.nn.functional.cosine_similarity(mx[i], rx, dim=-1).min() >= 0.9999
            assert torch.allclose(mx[i], rx, atol=1e-5)
    if cls:
        assert torch.equal(mx[:, 0], x[:, 0])  # cls untouched, always first


def reference_encoder(enc, pixels, r_list, prop_attn):
    """tome/patch/timm.py's block (merge between attention and MLP, proportional attention, keys
    averaged over heads as the metric) on mimc's block submodules, with the reference merge."""
    cls = enc.config.cls_token
    outs = []
    for image in enc.embed(pixels):
        x, sizes, sources = image, [1.0] * image.shape[0], [{p} for p in range(image.shape[0])]
        for block, r in zip(enc.blocks, r_list):
            bias = torch.tensor(sizes).log()[None, None, None, :] if prop_attn else None
            out, keys, _ = block.attn(block.norm1(x[None]), bias, return_keys=True)
            x = x + block.ls1(out)[0]
            x, sizes, sources = reference_tome(x, sizes, sources, keys[0], r, cls)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outs.append(enc.norm(x))
    return torch.stack(outs)


@pytest.mark.parametrize("make", [tiny_config, tiny_video_config])
@pytest.mark.parametrize("prop_attn", [False, True])
def test_encoder_equals_the_reference_forward(make, prop_attn):
    cfg = make(depth=4)
    r_list = [6, 4, 3, 5]  # the last is clipped: tiny 16 patches -> 10 -> 6 -> 3 (with cls: 1 left to merge)
    enc = build_encoder(cfg.replace(token_schedule={"method": "tome", "r": r_list, "prop_attn": prop_attn}), seed=0)
    pixels = torch.randn(2, *cfg.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = enc(pixels).last_hidden_state
        ref = reference_encoder(enc, pixels, r_list, prop_attn)
    assert got.shape == ref.shape and got.shape[1] == enc.token_plan.counts[-1]
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() >= 0.9999
    assert torch.allclose(got, ref, atol=1e-5)


# 3. r clipping, statically in the plan -------------------------------------------------------------
def upstream_counts(tokens, protected, r_list):
    counts = [tokens]
    for r in r_list:
        counts.append(counts[-1] - min(r, (counts[-1] - protected) // 2))
    return counts


@pytest.mark.parametrize("cls", [True, False])
def test_vit_b_r16_is_clipped_like_upstream(cls):
    vitb = EncoderConfig(image_size=224, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072, cls_token=cls,
                         pooling="cls" if cls else "mean", family="mae")
    schedule = TokenReductionConfig(method="tome", r=16).schedule(vitb)  # used to refuse block 12
    assert schedule["r"] == [16] * 12  # the request, as upstream's parse_r(12, 16)
    plan = token_ops.build_plan(vitb.replace(token_schedule=schedule))
    assert plan.merge_r == [16] * 11 + [10]  # 20 patch tokens left at block 12: at most 10 merge
    assert plan.counts == upstream_counts(196 + cls, int(cls), [16] * 12)
    assert plan.counts[-2:] == [20 + cls, 10 + cls]


def test_clipping_on_a_tiny_model():
    plan = token_ops.build_plan(tiny_config(token_schedule={"method": "tome", "r": [9, 8, 0, 5]}))
    assert plan.merge_r == [8, 4, 0, 2]  # 16 patches -> 8 -> 4 -> 4 -> 2
    assert plan.counts == [17, 9, 5, 5, 3]
    with pytest.raises(ConfigError, match="negative"):
        token_ops.build_plan(tiny_config(token_schedule={"method": "tome", "r": [1, -1, 0, 0]}))


def test_r_schedules_follow_parse_r():
    assert token_ops.tome_r_list(4, 3) == [3, 3, 3, 3]
    # parse_r(12, (8, -0.5)) written out: min 12, max 4, step -8/11, truncated.
    assert token_ops.tome_r_list(12, 8, inflection=-0.5) == [int(12 - 8 / 11 * i) for i in range(12)]
    assert token_ops.tome_r_list(4, [4, 2]) == [4, 2, 0, 0]
    with pytest.raises(ConfigError):
        token_ops.tome_r_list(2, [1, 1, 1])


def test_assignment_is_one_hot_and_covers_every_token():
    for prefix in (0, 1):
        s = token_ops.bipartite_assignment(torch.randn(2, 15, 8), r=4, protected=prefix)
        assert s.shape == (2, 11, 15)
        assert torch.equal(s.sum(dim=1), torch.ones(2, 15))  # every token lands in exactly one output
        assert set(s.unique().tolist()) == {0.0, 1.0}
    s = token_ops.bipartite_assignment(torch.randn(2, 15, 8), r=7, protected=1)  # everything but cls merges
    assert torch.equal(s[:, 0, 0], torch.ones(2)) and s.shape == (2, 8, 15)


def test_wrong_length_schedule_is_refused():
    with pytest.raises(ConfigError, match="r for 3 blocks"):
        Encoder(tiny_config(token_schedule={"method": "tome", "r": [1, 1, 1]}))
