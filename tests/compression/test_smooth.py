"""SmoothQuant / RepQ folding: exact in float, effective on outliers, strict about inputs."""
from __future__ import annotations

import pytest
import torch

from mimc.artifact import state_hash
from mimc.compression.registry import compress
from mimc.pipeline.stages import config_from_dict
from mimc.compression.smooth import RepQConfig, SmoothQuantConfig, channel_ranges
from mimc.errors import ConfigError, DataError
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config, tiny_video_config


def with_outliers(encoder):
    """Post-LN channel outliers like real ViTs have (a few channels 10-30x wider)."""
    with torch.no_grad():
        for block in encoder.blocks:
            block.norm1.weight[3] = 30.0
            block.norm2.bias[5] = 8.0
            block.norm2.weight[7] = -12.0
    return encoder


def batches(cfg, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *cfg.input_shape), generator=g)
    return [x[: n // 2], x[n // 2 :]]


@pytest.mark.parametrize(
    "config",
    [SmoothQuantConfig(alpha=0.5), SmoothQuantConfig(alpha=0.85), RepQConfig(), RepQConfig(symmetric=True)],
    ids=["sq0.5", "sq0.85", "repq", "repq-sym"],
)
def test_folding_is_exact_in_float_and_leaves_input_alone(config):
    enc = with_outliers(build_encoder(tiny_config(), seed=0))
    before = state_hash(enc)
    folded, record = compress(enc, config, batches(enc.config))
    assert state_hash(enc) == before  # the input encoder is untouched
    assert state_hash(folded) != before  # and the weights really changed
    x = batches(enc.config, seed=1)[0]  # inputs not used for calibration
    with torch.no_grad():
        a, b = enc(x), folded(x)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-4
    assert (a.pooled - b.pooled).abs().max() <= 1e-4
    assert record.metrics["fidelity"]["max_abs"] <= 1e-4
    assert record.metrics["pairs"] == 2 * enc.config.depth


def test_smoothquant_flattens_channel_ranges():
    enc = with_outliers(build_encoder(tiny_config(), seed=0))
    _, record = compress(enc, SmoothQuantConfig(alpha=0.5), batches(enc.config))
    m = record.metrics
    assert m["channel_range_spread_after"] < 0.6 * m["channel_range_spread_before"]


def test_repq_gives_every_channel_the_same_range():
    enc = with_outliers(build_encoder(tiny_config(), seed=0))
    data = batches(enc.config)
    folded, _ = compress(enc, RepQConfig(), data)
    for lo, hi in channel_ranges(folded, data).values():
        width = hi - lo
        assert torch.allclose(width, width.mean().expand_as(width), rtol=1e-3)
        assert torch.allclose(lo, lo.mean().expand_as(lo), atol=1e-3 * float(width.mean()))  # minima aligned


def test_smoothquant_scale_formula_on_one_pair():
    from mimc.compression.smooth import fold_smoothquant

    norm, lin = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.1, 1.0, -3.0, 1.0], [2.0, 0.0, 1.0, -1.0]]))
    w_before = lin.weight.detach().clone()
    act = torch.tensor([8.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    s = fold_smoothquant(norm, lin, act, alpha=0.5)
    expected = act.sqrt() / w_before.abs().amax(0).to(torch.float64).sqrt()
    assert torch.allclose(s, expected)
    assert torch.allclose(lin.weight, (w_before * expected[None, :].float()), rtol=1e-6)
    assert torch.allclose(norm.weight, (1.0 / expected).float(), rtol=1e-6)


def test_video_encoder_folds_exactly():
    enc = with_outliers(build_encoder(tiny_video_config(), seed=0))
    folded, _ = compress(enc, SmoothQuantConfig(alpha=0.5), batches(enc.config, n=4))
    x = batches(enc.config, n=2, seed=3)[0]
    with torch.no_grad():
        assert (enc(x).pooled - folded(x).pooled).abs().max() <= 1e-4


def test_configs_round_trip_and_reject_bad_values():
    for cfg in (SmoothQuantConfig(alpha=0.7, max_batches=3), RepQConfig(symmetric=True)):
        assert config_from_dict(cfg.name, cfg.to_dict()) == cfg
        assert cfg.needs_data
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="unknown option"):
        SmoothQuantConfig.from_dict({"alpha": 0.5, "beta": 1})
    with pytest.raises(ConfigError, match="max_batches"):
        RepQConfig(max_batches=0)


def test_needs_calibration_images_of_the_right_shape():
    enc = build_encoder(tiny_config(), seed=0)
    with pytest.raises(DataError, match="needs images"):
        compress(enc, SmoothQuantConfig())
    with pytest.raises(DataError, match="expects"):
        compress(enc, SmoothQuantConfig(), [torch.randn(2, 3, 16, 16)])
    with pytest.raises(DataError, match="no calibration batches"):
        compress(enc, RepQConfig(), [])


def test_repq_on_a_bias_free_qkv_keeps_the_artifact_loadable(tmp_path):
    from mimc.artifact import save_artifact
    from mimc.models.io import load_artifact

    enc = with_outliers(build_encoder(tiny_config(qkv_bias=False), seed=0))
    folded, _ = compress(enc, RepQConfig(), batches(enc.config))
    assert folded.config.qkv_bias and not enc.config.qkv_bias
    reloaded = load_artifact(save_artifact(folded, tmp_path / "a"))
    x = batches(enc.config, seed=1)[0]
    with torch.no_grad():
        assert (reloaded(x).pooled - enc(x).pooled).abs().max() <= 1e-4
