import math

import pytest
import torch

from mimc.errors import ConfigError
from mimc.models import token_ops
from mimc.models.vit import Encoder, build_encoder
from tests.conftest import tiny_config, tiny_video_config


# ToMe (merge, r clipping, schedules) is tested against a reference in tests/models/test_tome.py.


def test_topk_fuses_the_dropped_tokens_by_normalised_attention():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    sizes = torch.ones(2, 9, 1)
    scores = torch.rand(2, 8, generator=g)
    out, out_sizes = token_ops.topk_select(x, sizes, scores, k=5, prefix=1, fuse=True)
    assert out.shape == (2, 7, 4) and torch.equal(out[:, 0], x[:, 0])
    for bi in range(2):
        top = scores[bi].topk(5).indices
        rest = [i for i in range(8) if i not in top.tolist()]
        w = scores[bi, rest] / scores[bi, rest].sum()
        assert torch.allclose(out[bi, 1:6], x[bi, 1 + top])
        assert torch.allclose(out[bi, 6], (w[:, None] * x[bi, [1 + i for i in rest]]).sum(0), atol=1e-6)
    assert torch.equal(out_sizes.sum(1), sizes.sum(1))


def test_grid_pattern_is_even_and_tubes_repeat():
    half = token_ops.grid_keep_index((1, 4, 4), 0.5)
    assert half == [0, 2, 5, 7, 8, 10, 13, 15]  # a checkerboard
    quarter = token_ops.grid_keep_index((1, 4, 4), 0.25)
    assert quarter == [0, 2, 8, 10]  # every other row and column
    video = token_ops.grid_keep_index((3, 4, 4), 0.5)
    assert video == [t * 16 + i for t in range(3) for i in half]
    assert len(token_ops.grid_keep_index((1, 14, 14), 0.5)) == 98


def test_patch_variance_matches_per_patch_variance():
    img = torch.randn(2, 3, 16, 16)
    v = token_ops.patch_variance(img, patch=8, tubelet=1)
    patch = img[1, :, 8:16, 0:8]  # row 1, column 0 -> token 2
    assert torch.allclose(v[1, 2], patch.var(unbiased=False), atol=1e-6)
    vid = torch.randn(1, 4, 3, 16, 16)
    vv = token_ops.patch_variance(vid, patch=8, tubelet=2)
    tube = vid[0, 2:4, :, 0:8, 8:16]  # tube 1, row 0, column 1 -> token 4 + 1
    assert torch.allclose(vv[0, 5], tube.var(unbiased=False), atol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        {"method": "tome", "r": [-1, 0, 0, 0]},  # a too-large r is clipped as upstream does (test_tome.py)
        {"method": "tome", "r": [1, 1, 1]},  # one value per block
        {"method": "topk", "keep": 0.0, "blocks": [1]},
        {"method": "topk", "keep": 1.5, "blocks": [1]},
        {"method": "topk", "keep": 0.5, "blocks": [4]},  # depth 4: 0-based 4 is beyond
        {"method": "drop", "keep": 0.5, "pattern": "spiral"},
        {"method": "shuffle"},
    ],
)
def test_plan_rejects_impossible_schedules(schedule):
    with pytest.raises(ConfigError):
        Encoder(tiny_config(token_schedule=schedule))


def test_relative_bias_allows_grid_drop_only():
    with pytest.raises(ConfigError, match="drop"):
        Encoder(tiny_config(rel_pos_bias="per_block", token_schedule={"method": "tome", "r": [1, 1, 1, 1]}))
    with pytest.raises(ConfigError, match="grid"):
        Encoder(tiny_config(rel_pos_bias="shared", token_schedule={"method": "drop", "keep": 0.5, "pattern": "variance"}))


def test_grid_drop_slices_the_relative_bias():
    dense = build_encoder(tiny_config(rel_pos_bias="shared", layer_scale=True), seed=0)
    with torch.no_grad():
        dense.rel_pos_bias.table.normal_()
    enc = Encoder(dense.config.replace(token_schedule={"method": "drop", "keep": 0.5, "pattern": "grid"}))
    enc.load_state_dict(dense.state_dict())
    enc.eval()
    x = torch.randn(2, 3, 32, 32)
    # Reference: the dense encoder's own blocks on the kept tokens with the full bias sliced to them.
    kept = torch.tensor([0] + [1 + i for i in token_ops.grid_keep_index(dense.config.grid, 0.5)])
    with torch.no_grad():
        h = dense.embed(x)[:, kept]
        bias = dense.rel_pos_bias()[:, kept][:, :, kept]
        for block in dense.blocks:
            h = block(h, bias)
        expected = dense.norm(h)
        got = enc(x).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_config, tiny_video_config])
def test_no_reduction_is_exactly_dense(make):
    dense = build_encoder(make(), seed=0)
    x = torch.randn(2, *dense.config.input_shape)
    ref = dense(x)
    depth = dense.config.depth
    for schedule in (
        {"method": "tome", "r": [0] * depth},
        {"method": "topk", "keep": 1.0, "blocks": [1, 2]},
        {"method": "drop", "keep": 1.0, "pattern": "grid"},
        {"method": "drop", "keep": 1.0, "pattern": "variance"},
    ):
        enc = Encoder(dense.config.replace(token_schedule=schedule))
        enc.load_state_dict(dense.state_dict())
        out = enc.eval()(x)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state), schedule
        assert torch.equal(out.pooled, ref.pooled), schedule


@pytest.mark.parametrize("make", [tiny_config, tiny_video_config])
def test_sizes_sum_to_patch_count_and_pool_by_size(make):
    cfg = make(token_schedule={"method": "tome", "r": [3, 3, 2, 2]})
    enc = build_encoder(cfg, seed=0)
    x = torch.randn(2, *cfg.input_shape)
    with torch.no_grad():
        h, sizes = enc.embed(x), None
        for block in enc.blocks:
            h, sizes = block.forward_tokens(h, None, sizes)
        out = enc(x)
    prefix = cfg.num_prefix_tokens
    assert h.shape[1] == cfg.num_tokens - 10 == enc.token_plan.counts[-1]
    assert torch.equal(sizes[:, prefix:].sum(1), torch.full((2, 1), float(cfg.num_patches)))
    if prefix:
        assert torch.equal(sizes[:, 0], torch.ones(2, 1))  # cls is never merged
    weighted = (enc.norm(h)[:, prefix:] * sizes[:, prefix:]).sum(1) / cfg.num_patches
    assert torch.allclose(out.pooled, enc.pool_norm(weighted), atol=1e-6)


def test_topk_keeps_cls_and_scores_by_cls_when_cls_pooled():
    cfg = tiny_config(pooling="cls", token_schedule={"method": "topk", "keep": 0.5, "blocks": [0], "fuse": False, "score": "cls"})
    enc = build_encoder(cfg, seed=0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = enc.embed(x)
        attn_out, _, attn = enc.blocks[0].attn(enc.blocks[0].norm1(h), return_attn=True)
        h1 = h + attn_out
        top = attn[0, :, 0, 1:].mean(0).topk(8).indices
        out, _ = enc.blocks[0].forward_tokens(h, None, None)
    assert out.shape[1] == 1 + math.ceil(0.5 * 16)
    mlp_in = torch.cat([h1[:, :1], h1[:, 1 + top]], dim=1)
    expected = mlp_in + enc.blocks[0].mlp(enc.blocks[0].norm2(mlp_in))
    assert torch.allclose(out, expected, atol=1e-6)


def test_variance_drop_keeps_the_textured_patches():
    cfg = tiny_config(token_schedule={"method": "drop", "keep": 0.25, "pattern": "variance"})
    enc = build_encoder(cfg, seed=0)
    img = torch.zeros(1, 3, 32, 32)
    textured = [1, 6, 11, 12]  # patch numbers on the 4 x 4 grid
    for p in textured:
        r, c = divmod(p, 4)
        img[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = torch.randn(3, 8, 8)
    with torch.no_grad():
        kept = enc.drop_patches(enc.embed(img), img)
        full = enc.embed(img)
    assert kept.shape[1] == 1 + 4
    # Which original token each kept row is (rows are copied, so they match exactly).
    source = [int(((kept[0, i] - full[0]).abs().sum(-1) == 0).nonzero()[0]) for i in range(5)]
    assert source[0] == 0 and sorted(source[1:]) == [1 + p for p in textured]


def test_proportional_attention_changes_merged_outputs_only():
    base = tiny_config(token_schedule={"method": "tome", "r": [3, 3, 2, 2], "prop_attn": False})
    plain = build_encoder(base, seed=0)
    prop = Encoder(base.replace(token_schedule={"method": "tome", "r": [3, 3, 2, 2], "prop_attn": True}))
    prop.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = plain.eval()(x, output_hidden_states=True), prop.eval()(x, output_hidden_states=True)
    assert torch.equal(a.hidden_states[1], b.hidden_states[1])  # block 1 sees unit sizes: log 1 = 0
    assert not torch.allclose(a.pooled, b.pooled)
