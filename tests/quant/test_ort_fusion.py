"""The CPU graph's QAttention fusion: which blocks fuse, that the math is unchanged, and what stays unfused."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from mimc.quant.quantize import QuantizeConfig, quantize_onnx
from mimc.compression.registry import compress
from mimc.compression.tokens import TokenReductionConfig
from mimc.deploy.onnx import export_onnx
from mimc.runtime.session import run_onnx
from mimc.models.vit import build_encoder
from tests.quant.test_quantize import image_batches
from tests.conftest import tiny_config, tiny_video_config


def ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def fused_and_unfused(enc, tmp_path, batch=1, force=False, **config):
    """Quantize ``enc``'s export twice, with and without the fusion, from the same calibration."""
    src = tmp_path / "model.onnx"
    export_onnx(enc, src, batch=batch)
    reports = {}
    for fuse in (True, False):
        reports[fuse] = quantize_onnx(src, tmp_path / f"fuse_{fuse}.onnx", image_batches(enc.config),
                                      QuantizeConfig(fuse_attention=fuse, **config), image_batches(enc.config, n=8, seed=1),
                                      force=force)
    return src, reports


def max_diff(a, b, x):
    ya, yb = run_onnx(a, x), run_onnx(b, x)
    return max(float(np.abs(ya[k] - yb[k]).max()) for k in ya)


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False}, {"num_heads": 2, "head_dim": 16}],
                         ids=["plain", "no-qkv-bias", "inner-width-differs"])
def test_every_block_fuses_and_computes_the_same(tmp_path, overrides):
    enc = build_encoder(tiny_config(**overrides), seed=0)
    src, reports = fused_and_unfused(enc, tmp_path)
    depth = enc.config.depth
    fused, unfused = tmp_path / "fuse_True.onnx", tmp_path / "fuse_False.onnx"
    assert reports[True]["fused_attention_blocks"] == depth and reports[True]["unfused_attention"] == {}
    assert reports[False]["fused_attention_blocks"] == 0
    counts = ops(fused)
    assert counts["QAttention"] == depth and counts["Softmax"] == 0 and counts["MatMul"] == 0
    assert counts["MatMulIntegerToFloat"] == 3 * depth  # proj, fc1, fc2 stay separate
    x = image_batches(enc.config, n=4, seed=3)[0][:1]
    assert max_diff(fused, unfused, x) <= 1e-4  # same u8 x s8 GEMM, same float attention
    assert reports[True]["validation"]["passed"]


def test_relative_position_bias_stays_unfused_and_says_why(tmp_path):
    enc = build_encoder(tiny_config(rel_pos_bias="per_block", family="beit"), seed=0)
    _, reports = fused_and_unfused(enc, tmp_path)
    report = reports[True]
    assert report["fused_attention_blocks"] == 0
    assert list(report["unfused_attention"].values()) == [enc.config.depth]
    assert "relative position bias" in next(iter(report["unfused_attention"]))
    assert ops(tmp_path / "fuse_True.onnx")["QAttention"] == 0


def test_token_pruning_blocks_that_read_attention_stay_unfused(tmp_path):
    enc, _ = compress(build_encoder(tiny_config(), seed=0), TokenReductionConfig(method="topk", keep=0.5, at=(2,), fuse=False))
    # force: on a random tiny model int8 noise can move the top-k selection (the gate's cosine then
    # depends on the CPU's kernels); what is tested here is the fusion, which must not change the math
    src, reports = fused_and_unfused(enc, tmp_path, force=True)
    report = reports[True]
    # block 2 (1-based) reads its attention probabilities to rank tokens; the others fuse
    assert report["fused_attention_blocks"] == enc.config.depth - 1
    assert sum(report["unfused_attention"].values()) == 1
    x = image_batches(enc.config, n=4, seed=3)[0][:1]
    assert run_onnx(tmp_path / "fuse_True.onnx", x)["pooled"].shape == run_onnx(src, x)["pooled"].shape
    assert max_diff(tmp_path / "fuse_True.onnx", tmp_path / "fuse_False.onnx", x) <= 1e-4


@pytest.mark.parametrize("video, batch", [(True, 1), (False, "dynamic")], ids=["video", "dynamic-batch"])
def test_video_and_dynamic_batch_graphs_fuse(tmp_path, video, batch):
    enc = build_encoder(tiny_video_config() if video else tiny_config(), seed=0)
    _, reports = fused_and_unfused(enc, tmp_path, batch=batch)
    assert reports[True]["fused_attention_blocks"] == enc.config.depth
    fused = onnx.load(str(tmp_path / "fuse_True.onnx"))
    assert not any(n.op_type == "Shape" for n in fused.graph.node if "attn" in n.name)  # its shape arithmetic went too
    x = image_batches(enc.config, n=4, seed=3)[0][: 1 if batch == 1 else 3]
    assert max_diff(tmp_path / "fuse_True.onnx", tmp_path / "fuse_False.onnx", x) <= 1e-4


def test_int8_attention_and_tensorrt_graphs_are_not_fused(tmp_path):
    enc = build_encoder(tiny_config(), seed=0)
    src = tmp_path / "model.onnx"
    export_onnx(enc, src)
    for name, config in (("attn", QuantizeConfig(quantize_attention_matmuls=True)), ("trt", QuantizeConfig(target="tensorrt"))):
        report = quantize_onnx(src, tmp_path / f"{name}.onnx", image_batches(enc.config), config)
        assert report["fused_attention_blocks"] == 0 and ops(tmp_path / f"{name}.onnx")["QAttention"] == 0


def test_fuse_attention_option_is_checked_and_round_trips():
    from mimc.pipeline.stages import config_from_dict
    from mimc.errors import ConfigError

    cfg = QuantizeConfig(fuse_attention=False)
    assert config_from_dict("quantize", cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="fuse_attention"):
        QuantizeConfig(fuse_attention="yes")
