"""Block pruning: exact scores on hand-built blocks, each criterion's order, the residual-skip
semantics of removal, lineage in the manifest, and save -> load."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimc.artifact import save_artifact, state_hash
from mimc.models.io import load_artifact
from mimc.compression.block_scores import block_linear_weights, data_free_scores, entropy_exact, spearman
from mimc.compression.blocks import BlockPruningConfig, remove_blocks
from mimc.compression.registry import compress
from mimc.errors import ConfigError, DataError
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config


def _linears(block):
    return (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)


def _fill(block, values, seed=0):
    """Set the four linear kernels to ``values`` tiled in order; biases and norms to noise (ignored)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.as_tensor(values, dtype=torch.float32)
    with torch.no_grad():
        for lin in _linears(block):
            n = lin.weight.numel()
            lin.weight.copy_(values.repeat(n // len(values) + 1)[:n].reshape(lin.weight.shape))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
        block.norm1.weight.copy_(torch.randn(block.norm1.weight.shape, generator=g))


# Exact entropy ------------------------------------------------------------------------------------
def test_entropy_of_hand_built_block_is_exact(tiny_encoder):
    block = tiny_encoder.blocks[0]
    # Every kernel size here is a multiple of 4, so the tiling gives exact proportions 1/2, 1/4, 1/4.
    _fill(block, [0.5, 0.5, -0.25, 0.125])
    h, _ = entropy_exact(block_linear_weights(block), "fp16")
    assert h == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-12)
    _fill(block, [1.0, -2.0])
    assert entropy_exact(block_linear_weights(block), "fp16")[0] == pytest.approx(math.log(2), abs=1e-12)


def test_entropy_counts_fp16_values_not_fp32_and_merges_signed_zero(tiny_encoder):
    block = tiny_encoder.blocks[0]
    # 1.0 and 1.0 + 1e-5 are two fp32 values but one fp16 value; +0.0 and -0.0 are one value.
    _fill(block, [1.0, 1.0 + 1e-5])
    weights = block_linear_weights(block)
    assert entropy_exact(weights, "fp16")[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy_exact(weights, "fp32")[0] == pytest.approx(math.log(2), abs=1e-12)
    _fill(block, [0.0, -0.0])
    assert entropy_exact(block_linear_weights(block), "fp16")[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy_exact(block_linear_weights(block), "fp32")[0] == pytest.approx(0.0, abs=1e-12)


def test_fp32_entropy_is_degenerate_and_flagged_fp16_is_not(tiny_encoder):
    n = sum(w.size for w in block_linear_weights(tiny_encoder.blocks[0]))
    fp32, warn32 = data_free_scores(tiny_encoder.blocks, ["entropy"], dtype="fp32")
    fp16, warn16 = data_free_scores(tiny_encoder.blocks, ["entropy"], dtype="fp16")
    # Almost every fp32 value is unique: every block scores ln N and the ranking carries no signal.
    assert all(abs(h - math.log(n)) < 1e-3 for h in fp32["entropy"])
    assert warn32 and "degenerate" in warn32[0]
    assert not warn16
    assert all(h < math.log(n) - 0.5 for h in fp16["entropy"])
    _, record = compress(tiny_encoder, BlockPruningConfig(keep=2, dtype="fp32"))
    assert record.metrics["warnings"]


# Each criterion's order -------------------------------------------------------------------------
ORDER = [1, 3, 0, 2]  # constructed so this is the removal order (lowest score first)


def test_entropy_criteria_remove_fewest_distinct_values_first(tiny_encoder):
    levels = {0: 8, 1: 2, 2: 64, 3: 4}  # ln 8, ln 2, ln 64, ln 4 nats
    for i, m in levels.items():
        _fill(tiny_encoder.blocks[i], np.linspace(-0.1, 0.1, m))
    scores, _ = data_free_scores(tiny_encoder.blocks, ["entropy", "entropy_hist"])
    for name in ("entropy", "entropy_hist"):
        assert scores[name] == pytest.approx([math.log(levels[i]) for i in range(4)], abs=1e-9)
        assert sorted(range(4), key=lambda i: scores[name][i]) == ORDER
    _, record = compress(tiny_encoder, BlockPruningConfig(keep=2, criterion="entropy"))
    assert record.metrics["removed_blocks"] == sorted(ORDER[:2])


@pytest.mark.parametrize("criterion", ["l1", "l2", "variance", "entropy_hist"])
def test_magnitude_criteria_remove_smallest_weights_first(tiny_encoder, criterion):
    scale = {0: 3.0, 1: 1.0, 2: 4.0, 3: 2.0}
    with torch.no_grad():
        for i, s in scale.items():
            for lin in _linears(tiny_encoder.blocks[i]):
                lin.weight.mul_(s)
    scores, _ = data_free_scores(tiny_encoder.blocks, [criterion])
    assert sorted(range(4), key=lambda i: scores[criterion][i]) == ORDER


def test_moments_match_numpy(tiny_encoder):
    scores, _ = data_free_scores(tiny_encoder.blocks, ["l1", "l2", "variance", "kurtosis"])
    for i, block in enumerate(tiny_encoder.blocks):
        w = np.concatenate(block_linear_weights(block)).astype(np.float64)
        d = w - w.mean()
        assert scores["l1"][i] == pytest.approx(np.abs(w).mean(), rel=1e-5)
        assert scores["l2"][i] == pytest.approx(np.sqrt((w * w).mean()), rel=1e-5)
        assert scores["variance"][i] == pytest.approx(w.var(), rel=1e-4)
        assert scores["kurtosis"][i] == pytest.approx((d**4).mean() / (d**2).mean() ** 2 - 3, abs=1e-3)


def test_kurtosis_removes_light_tailed_blocks_first(tiny_encoder):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, lin_set in enumerate(_linears(b) for b in tiny_encoder.blocks):
            for lin in lin_set:
                shape = lin.weight.shape
                if i == 0:  # Laplace: excess kurtosis 3
                    u = torch.rand(shape, generator=g) - 0.5
                    w = -u.sign() * torch.log1p(-2 * u.abs())
                elif i == 1:  # uniform: -1.2
                    w = torch.rand(shape, generator=g) - 0.5
                elif i == 2:  # Gaussian with 1 % outliers at 10 sigma: heavy tail
                    w = torch.randn(shape, generator=g)
                    w[torch.rand(shape, generator=g) < 0.01] = 10.0
                else:  # Gaussian: 0
                    w = torch.randn(shape, generator=g)
                lin.weight.copy_(w * 0.02)
    scores, _ = data_free_scores(tiny_encoder.blocks, ["kurtosis"])
    assert sorted(range(4), key=lambda i: scores["kurtosis"][i]) == ORDER


def test_random_is_seeded_and_last_removes_the_deepest(tiny_encoder):
    a, _ = data_free_scores(tiny_encoder.blocks, ["random"], seed=3)
    b, _ = data_free_scores(tiny_encoder.blocks, ["random"], seed=3)
    c, _ = data_free_scores(tiny_encoder.blocks, ["random"], seed=4)
    assert a == b and a != c
    _, record = compress(tiny_encoder, BlockPruningConfig(ratio=0.5, criterion="last"))
    assert record.metrics["removed_blocks"] == [2, 3]


def test_sensitivity_removes_blocks_whose_removal_changes_nothing(tiny_encoder):
    with torch.no_grad():  # blocks 1 and 3 add zero to the residual stream: removing them is free
        for i in (1, 3):
            for lin in (tiny_encoder.blocks[i].attn.proj, tiny_encoder.blocks[i].mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    batches = list(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(3))
    new, record = compress(tiny_encoder, BlockPruningConfig(keep=2, criterion="sensitivity"), batches)
    s = record.metrics["scores"]["sensitivity"]
    assert s[1] == pytest.approx(0.0, abs=1e-6) and s[3] == pytest.approx(0.0, abs=1e-6)
    assert min(s[0], s[2]) > 1e-4
    assert record.metrics["removed_blocks"] == [1, 3]
    assert record.metrics["fidelity_data"]["pooled_cosine_min"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataError):
        compress(tiny_encoder, BlockPruningConfig(keep=2, criterion="sensitivity"))


# Removal semantics --------------------------------------------------------------------------------
@pytest.mark.parametrize("rel_pos_bias", ["none", "per_block", "shared"])
def test_removal_equals_residual_skip(rel_pos_bias):
    enc = build_encoder(tiny_config(rel_pos_bias=rel_pos_bias, layer_scale=True), seed=0)
    with torch.no_grad():  # non-zero tables so a bias that stayed with the wrong block would show
        for name, p in enc.named_parameters():
            if name.endswith("table") or name.endswith("gamma"):
                p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new = remove_blocks(enc, [0, 2])
    # Manual: the removed blocks are replaced by the identity (the residual stream passes through).
    with torch.no_grad():
        h = enc.embed(x)
        shared = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        for i in (1, 3):
            h = enc.blocks[i](h, shared)
        h = enc.norm(h)
        expected = enc.pool(h)
        zeroed = build_encoder(enc.config, seed=0)
        zeroed.load_state_dict(enc.state_dict())
        for i in (0, 2):  # zero contribution = a block that passes the residual through
            for lin in (zeroed.blocks[i].attn.proj, zeroed.blocks[i].mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        got = new(x)
        torch.testing.assert_close(got.pooled, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.last_hidden_state, zeroed(x).last_hidden_state, atol=1e-5, rtol=0)
    assert new.config.depth == 2 and new.config.block_ids == [1, 3] and new.config.source_depth == 4


def test_input_encoder_untouched_and_per_block_lists_follow(tiny_encoder):
    before = state_hash(tiny_encoder)
    cfg_before = tiny_encoder.config.to_dict()
    new, _ = compress(tiny_encoder, BlockPruningConfig(blocks=(1, 2)))
    assert state_hash(tiny_encoder) == before and tiny_encoder.config.to_dict() == cfg_before
    assert len(tiny_encoder.blocks) == 4 and len(new.blocks) == 2
    assert all(p.data_ptr() != q.data_ptr() for p in new.parameters() for q in tiny_encoder.parameters())

    enc = build_encoder(tiny_config(block_mlp_dims=[32, 64, 96, 128]), seed=0)
    new = remove_blocks(enc, [1, 2])
    assert new.config.block_mlp_dims == [32, 128]
    assert [b.mlp.fc1.out_features for b in new.blocks] == [32, 128]


def test_pruning_twice_keeps_original_block_ids(tiny_encoder):
    once, _ = compress(tiny_encoder, BlockPruningConfig(blocks=(0,)))
    twice, record = compress(once, BlockPruningConfig(blocks=(1,)))  # position 1 of [1, 2, 3] is block 2
    assert record.metrics["removed_blocks"] == [2] and twice.config.block_ids == [1, 3]
    assert [s.name for s in twice.manifest.stages] == ["prune", "prune"]
    # blocks are positions; a pruned model's tables show source ids, so an id past the depth is refused naming them
    with pytest.raises(ConfigError, match=r"give positions 0..2 \(its tables show the source's ids \[1, 2, 3\]\)"):
        compress(once, BlockPruningConfig(blocks=(3,)))


# Config and lineage -------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = BlockPruningConfig(blocks=(5, 3), criterion="l2", seed=7)
    assert cfg.blocks == (3, 5)
    assert BlockPruningConfig.from_dict(cfg.to_dict()) == cfg
    assert BlockPruningConfig.from_dict({"ratio": 0.25}).needs_data is False
    assert BlockPruningConfig(keep=3, criterion="sensitivity").needs_data is True
    bad = [
        dict(ratio=0.0), dict(ratio=1.0), dict(ratio=-0.5), dict(), dict(ratio=0.5, keep=2), dict(keep=0),
        dict(ratio=0.5, criterion="magic"), dict(ratio=0.5, dtype="int8"), dict(blocks=(1, 1)), dict(blocks=()),
        dict(ratio=0.5, hist_bins=1),
    ]
    for options in bad:
        with pytest.raises(ConfigError):
            BlockPruningConfig(**options)
    with pytest.raises(ConfigError, match="unknown option"):
        BlockPruningConfig.from_dict({"ratio": 0.5, "bogus": 1})


@pytest.mark.parametrize("options", [dict(keep=5), dict(keep=4), dict(blocks=(4,)), dict(ratio=0.1), dict(ratio=0.9)])
def test_impossible_counts_for_this_depth_raise(tiny_encoder, options):
    with pytest.raises(ConfigError):
        compress(tiny_encoder, BlockPruningConfig(**options))


def test_manifest_records_scores_and_removed_blocks_and_save_load(tiny_encoder, tmp_path):
    new, record = compress(tiny_encoder, BlockPruningConfig(ratio=0.5, criterion="entropy"))
    m = new.manifest.stages[-1].metrics
    assert m is record.metrics
    assert len(m["scores"]["entropy"]) == 4 and len(m["removed_blocks"]) == 2
    assert sorted(m["removed_blocks"] + m["kept_blocks"]) == [0, 1, 2, 3]
    assert m["params_after"] < m["params_before"] and 0.4 < m["macs_ratio"] < 0.6
    assert 0.0 < m["fidelity_deterministic"]["pooled_cosine_mean"] < 1.0
    assert record.config == BlockPruningConfig(ratio=0.5).to_dict()

    save_artifact(new, tmp_path / "pruned")
    loaded = load_artifact(tmp_path / "pruned")
    assert loaded.config.block_ids == new.config.block_ids and loaded.config.depth == 2
    assert loaded.manifest.stages[-1].metrics["removed_blocks"] == m["removed_blocks"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pooled, new(x).pooled, atol=0, rtol=0)


def test_spearman_handles_ties_and_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_sensitivity_prefix_shortcut_matches_the_full_forward():
    from mimc.compression.block_scores import _sensitivity_by_swapping, sensitivity_scores

    enc = build_encoder(tiny_config(rel_pos_bias="shared", layer_scale=True), seed=2)
    batches = list(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(2))
    assert sensitivity_scores(enc, batches) == pytest.approx(_sensitivity_by_swapping(enc, batches), abs=1e-6)


def test_video_encoder_prunes_and_records_fidelity(tiny_video_encoder):
    new, record = compress(tiny_video_encoder, BlockPruningConfig(ratio=0.25, criterion="entropy_hist"))
    assert new.config.depth == 3 and new.config.num_frames == 4
    x = torch.randn(2, *new.config.input_shape)
    with torch.no_grad():
        assert new(x).pooled.shape == (2, 64)
    assert 0.0 < record.metrics["fidelity_deterministic"]["pooled_cosine_mean"] <= 1.0


@pytest.mark.parametrize("options, message", [(dict(hist_bins=5), "hist_bins only applies to criterion entropy_hist"),
                                              (dict(dtype="bf16", criterion="l1"), "dtype only applies to criterion entropy")])
def test_an_option_the_criterion_would_ignore_is_refused(options, message):
    # mimc prune ref --ratio 0.5 --hist-bins 5 (criterion entropy) recorded hist_bins 5 and left it unused, exit 0
    with pytest.raises(ConfigError, match=f"^{message}: drop it$"):
        BlockPruningConfig(ratio=0.5, **options)
    BlockPruningConfig(ratio=0.5, criterion="entropy_hist", hist_bins=5)
    BlockPruningConfig(ratio=0.5, dtype="bf16")
