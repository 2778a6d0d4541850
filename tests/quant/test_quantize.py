"""Graph-level quantization: placement, exact per-channel scales, determinism, fidelity, fp8, inputs."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mimc.quant.calibrate import collect_channel_ranges, kl_threshold
from mimc.quant.fold_graph import fold_pairs, norm_linear_pairs
from mimc.quant.qdq_graph import GraphIndex, linear_sites
from mimc.quant.quantize import QuantizeConfig, quantize_onnx
from mimc.pipeline.stages import config_from_dict
from mimc.data import preprocess
from mimc.errors import BadInputError, ConfigError, DataError, ValidationError
from mimc.deploy.onnx import export_onnx
from mimc.runtime.session import run_onnx
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config, tiny_video_config


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """A tiny exported encoder with post-LN outliers, and image batches for it."""
    enc = build_encoder(tiny_config(), seed=0)
    with torch.no_grad():
        for block in enc.blocks:
            block.norm1.weight[3] = 20.0
            block.norm2.bias[5] = 6.0
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(enc, path)
    return path, enc


def image_batches(cfg, n=24, seed=0, batch=8):
    """Two classes of textures, like the tiny_images fixture, preprocessed for ``cfg``."""
    rng = np.random.default_rng(seed)
    xs = np.linspace(0, 1, 32)[None, :, None]
    images = []
    for i in range(n):
        base = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + 6 * (i % 2)) * xs + rng.uniform(0, 6.28))
        img = np.broadcast_to(base, (32, 32, 3)) * rng.uniform(0.7, 1.0) + rng.normal(0, 0.05, (32, 32, 3))
        images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return list(preprocess(images, cfg).split(batch))


def ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_tensorrt_graph_quantizes_only_the_four_linears(graph, tmp_path):
    path, enc = graph
    out = tmp_path / "model.int8.onnx"
    report = quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig(target="tensorrt"),
                           image_batches(enc.config, n=8, seed=1))
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and producer.get(n.input[1]) is not None
                         and producer[n.input[1]].op_type == "DequantizeLinear"]
    names = sorted(n.name for n in quantized_matmuls)
    assert len(names) == 4 * enc.config.depth == report["quantized_linears"]
    assert all(any(k in n for k in ("qkv", "proj", "fc1", "fc2")) for n in names)
    for n in model.graph.node:  # LayerNorm, Softmax, GELU (Erf), residual Adds, patch embedding: float inputs
        if n.op_type in ("LayerNormalization", "Softmax", "Erf", "Conv", "Add"):
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    # One shared Q per activation tensor (norm1 output feeds qkv only; 4 tensors per block).
    assert ops(out)["QuantizeLinear"] == 4 * enc.config.depth
    # Activations symmetric int8 (TensorRT has no zero point), weights per output channel on axis 1.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 2:
            assert next(a.i for a in n.attribute if a.name == "axis") == 1
    assert report["validation"]["fidelity"]["image_cosine_min"] >= 0.99 and report["validation"]["passed"]


def test_per_channel_weight_scales_are_exact(graph, tmp_path):
    path, enc = graph
    out = tmp_path / "cpu.onnx"
    quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig(target="cpu"))
    src = onnx.load(str(path))
    weights = {s.matmul.name: s.weight for s in linear_sites(GraphIndex.build(src))}
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for n in model.graph.node:
        if n.op_type in ("MatMulIntegerToFloat", "QAttention") and n.input[1] in inits:  # QAttention: qkv + attention
            w = weights[n.name.removesuffix("_qattention")[: -len("_mimc_w_int8")]]
            q, scale = inits[n.input[1]], inits[n.input[3 if n.op_type == "MatMulIntegerToFloat" else 4]]
            assert q.dtype == np.int8 and scale.shape == (w.shape[1],)
            np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127.0, rtol=1e-6)
            assert np.abs(q).max(axis=0).min() == 127  # every output channel uses its full range
            assert np.all(np.abs(q * scale[None, :] - w) <= scale[None, :] / 2 + 1e-7)
            checked += 1
    assert checked == 4 * enc.config.depth


def test_cpu_graph_runs_integer_matmuls_and_keeps_norms_float(graph, tmp_path):
    path, enc = graph
    out = tmp_path / "cpu.onnx"
    report = quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig(quantize_attention_matmuls=True),
                           image_batches(enc.config, n=8, seed=1))
    counts = ops(out)
    depth = enc.config.depth
    assert counts["MatMulIntegerToFloat"] == 6 * depth and counts["MatMul"] == 0  # 4 linears + 2 attention matmuls
    assert counts["LayerNormalization"] == ops(path)["LayerNormalization"] and counts["Softmax"] == depth
    model = onnx.load(str(out))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all(producer.get(i) != "QuantizeLinear" for i in n.input)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mimc_precision"] == "int8" and "mimc_encoder_config" in meta and "mimc_quantization" in meta
    assert report["runnable_here"] and report["validation"]["fidelity"]["pooled_cosine_min"] >= 0.99


def test_same_inputs_give_byte_identical_graphs(graph, tmp_path):
    path, enc = graph
    config = QuantizeConfig(method="percentile", smooth=0.5)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    quantize_onnx(path, a, image_batches(enc.config), config)
    quantize_onnx(path, b, image_batches(enc.config), config)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.onnx"
    quantize_onnx(path, c, image_batches(enc.config, seed=5), config)
    assert c.read_bytes() != a.read_bytes()  # other calibration images, other scales


@pytest.mark.parametrize("config", [QuantizeConfig(method="minmax"), QuantizeConfig(method="entropy", repq=True),
                                    QuantizeConfig(smooth=0.5, target="tensorrt")], ids=["minmax", "entropy-repq", "sq-trt"])
def test_fidelity_gate_on_held_out_images(graph, tmp_path, config):
    path, enc = graph
    report = quantize_onnx(path, tmp_path / "q.onnx", image_batches(enc.config), config, image_batches(enc.config, n=8, seed=1))
    val = report["validation"]
    fid = val["fidelity"]
    assert val["inputs"] == "held-out images" and fid["n_images"] == 8
    assert fid["pooled_cosine_min"] >= 0.99 and fid["sqnr_db"] >= 20 and fid["token_sqnr_db"] >= 20


def test_graph_folding_is_exact(graph, tmp_path):
    path, enc = graph
    model = onnx.load(str(path))
    idx = GraphIndex.build(model)
    pairs = norm_linear_pairs(idx, linear_sites(idx))
    assert len(pairs) == 2 * enc.config.depth
    ranges = collect_channel_ranges(model, [ln.output[0] for ln, _ in pairs], image_batches(enc.config))
    fold_pairs(model, pairs, ranges, smooth_alpha=0.5, repq=True, symmetric=False)
    folded = tmp_path / "folded.onnx"
    onnx.save(model, str(folded))
    x = image_batches(enc.config, n=2, seed=2)[0][:1]
    a, b = run_onnx(path, x), run_onnx(folded, x)
    assert np.abs(a["pooled"] - b["pooled"]).max() <= 1e-4
    assert not np.array_equal(numpy_helper.to_array(model.graph.initializer[-1]), 0)


def test_fp8_graph_passes_the_checker_and_says_it_cannot_run_here(graph, tmp_path):
    path, enc = graph
    out = tmp_path / "model.fp8.onnx"
    report = quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig(precision="fp8"))
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    zps = [i for i in model.graph.initializer if i.name.endswith("_mimc_zp")]
    assert zps and all(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in zps)
    assert report["runnable_here"] is False and "FP8" in report["runnable_note"]
    assert report["target"] == "tensorrt" and report["validation"]["fidelity"]["image_cosine_min"] >= 0.99


def test_block_pruned_and_video_encoders_quantize(tmp_path):
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.registry import compress

    pruned, _ = compress(build_encoder(tiny_config(), seed=0), BlockPruningConfig(keep=2, criterion="last"))
    video = build_encoder(tiny_video_config(), seed=0)
    for name, enc in (("pruned", pruned), ("video", video)):
        src = tmp_path / f"{name}.onnx"
        export_onnx(enc, src)
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn((4, *enc.config.input_shape), generator=g) for _ in range(2)]
        report = quantize_onnx(src, tmp_path / f"{name}.int8.onnx", calib, QuantizeConfig())
        assert report["quantized_linears"] == 4 * enc.config.depth
        assert report["validation"]["fidelity"]["image_cosine_min"] >= 0.99


def test_bad_inputs_write_nothing(graph, tmp_path, monkeypatch):
    path, enc = graph
    out = tmp_path / "q.onnx"
    with pytest.raises(DataError, match="no calibration images"):
        quantize_onnx(path, out, [], QuantizeConfig())
    with pytest.raises(DataError, match="expects"):
        quantize_onnx(path, out, [torch.randn(2, 3, 16, 16)], QuantizeConfig())
    foreign = onnx.load(str(path))
    del foreign.metadata_props[:]
    (tmp_path / "foreign").mkdir()
    onnx.save(foreign, str(tmp_path / "foreign" / "m.onnx"))
    with pytest.raises(BadInputError, match="not a mimc graph"):
        quantize_onnx(tmp_path / "foreign" / "m.onnx", out, image_batches(enc.config), QuantizeConfig())
    with pytest.raises(BadInputError, match="does not exist"):
        quantize_onnx(path, tmp_path / "missing" / "q.onnx", image_batches(enc.config), QuantizeConfig())
    quantize_onnx(path, tmp_path / "once.onnx", image_batches(enc.config), QuantizeConfig())
    with pytest.raises(BadInputError, match="already quantized"):
        quantize_onnx(tmp_path / "once.onnx", out, image_batches(enc.config), QuantizeConfig())
    from mimc.deploy import validate

    monkeypatch.setitem(validate.GATES, "int8", validate.Gate(min_cosine=1.01))
    with pytest.raises(ValidationError, match="fidelity gate"):
        quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig())
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "once.onnx"]


def test_config_round_trip_and_validation():
    cfg = QuantizeConfig(precision="fp8", method="entropy", smooth=0.5, repq=True)
    assert config_from_dict("quantize", cfg.to_dict()) == cfg
    assert cfg.resolved_target == "tensorrt" and not cfg.quantize_attention_matmuls
    assert QuantizeConfig().resolved_target == "cpu" and not QuantizeConfig().quantize_attention_matmuls
    for bad in ({"precision": "int4"}, {"method": "mse"}, {"n": 0}, {"smooth": 2.0}, {"precision": "fp8", "target": "cpu"},
                {"quantize_attention_matmuls": None}):
        with pytest.raises(ConfigError):
            QuantizeConfig(**bad)



def test_options_that_would_do_nothing_are_refused():
    """--percentile with another --method, and --no-fuse-attention where nothing is fused (another target,
    or --attention), were accepted and silently ignored."""
    for bad, named in (({"method": "minmax", "percentile": 99.0}, "percentile"), ({"method": "entropy", "percentile": 95.0}, "percentile"),
                       ({"target": "openvino", "fuse_attention": False}, "fuse_attention"),
                       ({"precision": "fp8", "fuse_attention": False}, "fuse_attention"),
                       ({"quantize_attention_matmuls": True, "fuse_attention": False}, "fuse_attention")):
        with pytest.raises(ConfigError, match=named) as exc:
            QuantizeConfig(**bad)
        assert named in exc.value.options
    assert QuantizeConfig(method="minmax").percentile == 99.99 and not QuantizeConfig(fuse_attention=False).fuse_attention


def test_held_out_images_fewer_than_the_static_batch_are_named(tmp_path):
    """A batch-4 graph gated on 2 held-out images said "no images to compare on: pass a non-empty data
    set" after calibrating; it now names the batch and the held-out count before any work."""
    enc = build_encoder(tiny_config(), seed=0)
    export_onnx(enc, tmp_path / "b4.onnx", batch=4, validate=False)
    with pytest.raises(DataError, match="static batch of 4.*2 held-out"):
        quantize_onnx(tmp_path / "b4.onnx", tmp_path / "q.onnx", image_batches(enc.config, n=8), QuantizeConfig(),
                      image_batches(enc.config, n=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b4.onnx"]


def test_output_onto_a_folder_is_refused_before_any_work(graph, tmp_path):
    """An output .onnx naming an existing folder was an IsADirectoryError traceback once the work was done."""
    path, enc = graph
    (tmp_path / "q.onnx").mkdir()
    with pytest.raises(BadInputError, match="is a directory"):
        quantize_onnx(path, tmp_path / "q.onnx", image_batches(enc.config), QuantizeConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]

def test_kl_threshold_clips_long_tails_only():
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.normal(0, 1, 200_000), [40.0]]))  # one far outlier
    counts, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    t = kl_threshold(counts, edges[1])
    assert 2.5 < t < 20.0  # keeps the Gaussian body, drops the outlier's empty range


def test_token_merged_graph_is_gated_on_the_pooled_feature(tmp_path):
    from mimc.compression.registry import compress
    from mimc.compression.tokens import TokenReductionConfig

    enc, _ = compress(build_encoder(tiny_config(), seed=0), TokenReductionConfig(method="tome", r=2))
    src = tmp_path / "tome.onnx"
    export_onnx(enc, src)
    report = quantize_onnx(src, tmp_path / "tome.int8.onnx", image_batches(enc.config), QuantizeConfig(target="tensorrt"),
                           image_batches(enc.config, n=8, seed=1))
    assert report["validation"]["gated_outputs"] == ["pooled"] and report["validation"]["fidelity"]["image_cosine_min"] >= 0.99


def test_calibration_and_held_out_images_are_disjoint_and_seeded(tmp_path, tiny_images):
    from mimc.pipeline.graph_stages import split_images
    from mimc.data import load_images

    images, labels = tiny_images
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    data = load_images(tmp_path / "d.npz", tiny_config())
    calib, held = split_images(data, n=12, seed=0)
    assert len(calib) == 12 and len(held) == 12
    flat = lambda s: {row.numpy().tobytes() for row in s.pixels}  # noqa: E731
    assert not flat(calib) & flat(held)
    again, _ = split_images(data, n=12, seed=0)
    assert again.sha256 == calib.sha256 and split_images(data, n=12, seed=1)[0].sha256 != calib.sha256


def test_percentile_range_cuts_each_tail_separately():
    from mimc.quant.calibrate import _Histogram, _percentile_range

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1.0, 1.0, 100_000), [-50.0, 60.0]])  # skewed, two far outliers
    h = _Histogram(float(x.min()), float(x.max()))
    h.add(x)
    lo, hi = _percentile_range(h, 99.9)
    assert -50.0 < lo < 0.0 and 1.0 < hi < 60.0
    assert abs(lo - np.quantile(x, 0.001)) < 0.2 and abs(hi - np.quantile(x, 0.999)) < 0.2


def test_repq_gives_a_bias_to_linears_without_one(tmp_path):
    enc = build_encoder(tiny_config(qkv_bias=False), seed=0)
    src = tmp_path / "nobias.onnx"
    export_onnx(enc, src)
    model = onnx.load(str(src))
    idx = GraphIndex.build(model)
    pairs = norm_linear_pairs(idx, linear_sites(idx))
    ranges = collect_channel_ranges(model, [ln.output[0] for ln, _ in pairs], image_batches(enc.config))
    fold_pairs(model, pairs, ranges, smooth_alpha=None, repq=True, symmetric=True)
    assert sum(n.name.endswith("_mimc_bias") for n in model.graph.node) == enc.config.depth  # one per qkv
    onnx.save(model, str(tmp_path / "folded.onnx"))
    x = image_batches(enc.config, n=2, seed=2)[0][:1]
    assert np.abs(run_onnx(src, x)["pooled"] - run_onnx(tmp_path / "folded.onnx", x)["pooled"]).max() <= 1e-4
