"""Width pruning: exact slicing (removed units zeroed in the original give the same outputs),
per-block widths in the config, importance criteria, and export + int8 of the narrower model."""
from __future__ import annotations

import pytest
import torch

from mimc.compression.registry import compress
from mimc.pipeline.stages import config_from_dict
from mimc.compression.width import WidthPruningConfig
from mimc.errors import ConfigError, DataError
from mimc.models.vit import build_encoder, flops_per_image
from tests.conftest import tiny_config, tiny_video_config


def zero_removed(encoder, metrics):
    """The original with every removed neuron's fc2 column and removed head's proj columns zeroed."""
    import copy

    ref = copy.deepcopy(encoder)
    with torch.no_grad():
        for i, block in enumerate(ref.blocks):
            fc1_rows = block.mlp.fc1.weight.shape[0]
            kept = set(_kept_neurons(encoder.blocks[i], metrics, i))
            for j in range(fc1_rows):
                if j not in kept:
                    block.mlp.fc2.weight[:, j] = 0
            hd = block.attn.head_dim
            for h in range(block.attn.num_heads):
                if h not in metrics["kept_heads"][i]:
                    block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
    return ref


def _kept_neurons(block, metrics, i):
    return metrics["kept_neurons"][i]


@pytest.mark.parametrize("overrides", [{}, {"rel_pos_bias": "per_block", "family": "beit", "layer_scale": True}, {"qkv_bias": False}],
                         ids=["plain", "beit-like", "no-qkv-bias"])
def test_slicing_is_exact(overrides):
    enc = build_encoder(tiny_config(**overrides), seed=0)
    if overrides.get("rel_pos_bias"):
        with torch.no_grad():
            for b in enc.blocks:
                b.attn.rel_pos_bias.table.normal_()
    new, record = compress(enc, WidthPruningConfig(mlp=0.5, heads=0.5, round_to=8))
    m = record.metrics
    assert new.config.block_mlp_dims == [64] * 4 and new.config.block_heads == [2] * 4
    x = torch.randn(2, 3, 32, 32)
    ref = zero_removed(enc, m)
    assert torch.allclose(new(x).last_hidden_state, ref(x).last_hidden_state, atol=1e-5)
    assert m["macs_ratio"] == pytest.approx(flops_per_image(new.config) / flops_per_image(enc.config))
    assert m["params_after"] < m["params_before"] and 0 < m["fidelity_deterministic"]["pooled_cosine_mean"] <= 1


def test_l2_keeps_the_largest_units_and_activation_needs_images():
    enc = build_encoder(tiny_config(), seed=0)
    with torch.no_grad():
        enc.blocks[0].mlp.fc1.weight[7] *= 50  # an obviously important neuron
        enc.blocks[0].attn.proj.weight[:, 16:32] *= 50  # head 1's output path
    _, record = compress(enc, WidthPruningConfig(mlp=0.9, heads=0.75, round_to=8))
    assert 7 in record.metrics["kept_neurons"][0] and record.metrics["kept_heads"][0] == [1]
    with pytest.raises(DataError):
        compress(enc, WidthPruningConfig(mlp=0.5, criterion="activation"))
    new, record = compress(enc, WidthPruningConfig(mlp=0.5, criterion="activation"), [torch.randn(4, 3, 32, 32)])
    assert "fidelity_data" in record.metrics and new.config.block_mlp_dims == [64] * 4


def test_widths_round_to_tiles_and_bad_options_are_refused():
    assert WidthPruningConfig(mlp=0.3).kept_mlp(3072) == 2144 and WidthPruningConfig(mlp=0.999).kept_mlp(3072) == 16
    assert WidthPruningConfig(heads=0.5).kept_heads(12) == 6 and WidthPruningConfig(heads=0.99).kept_heads(12) == 1
    for bad in ({}, {"mlp": 1.0}, {"heads": -0.1}, {"mlp": 0.5, "criterion": "taylor"}, {"mlp": 0.5, "round_to": 0}):
        with pytest.raises(ConfigError):
            WidthPruningConfig(**bad)
    cfg = WidthPruningConfig(mlp=0.25, heads=0.5, criterion="activation")
    assert config_from_dict("width", cfg.to_dict()) == cfg and cfg.needs_data
    with pytest.raises(ConfigError, match="shares one relative position bias"):
        compress(build_encoder(tiny_config(rel_pos_bias="shared", family="beit"), seed=0), WidthPruningConfig(heads=0.5))


def test_narrow_model_survives_other_stages_export_and_fused_int8(tmp_path):
    from mimc.artifact import save_artifact
    from mimc.models.io import load_artifact
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.deploy.onnx import export_onnx
    from tests.quant.test_quantize import image_batches

    for cfg in (tiny_config(), tiny_video_config()):
        enc = build_encoder(cfg, seed=0)
        narrow, _ = compress(enc, WidthPruningConfig(mlp=0.5, heads=0.5, round_to=8))
        shallow, _ = compress(narrow, BlockPruningConfig(keep=3, criterion="l2"))
        assert shallow.config.block_heads == [2] * 3
        art = save_artifact(shallow, tmp_path / f"a{cfg.num_frames}")
        x = torch.randn(1, *cfg.input_shape)
        assert torch.allclose(load_artifact(art)(x).pooled, shallow(x).pooled)
        export_onnx(shallow, art / "model.onnx")  # validated against torch inside
    report = quantize_onnx(tmp_path / "a1" / "model.onnx", tmp_path / "q.onnx", image_batches(tiny_config()), QuantizeConfig())
    assert report["fused_attention_blocks"] == 3 and report["validation"]["passed"]
