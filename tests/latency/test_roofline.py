"""Roofline prediction: exact on a one-node graph, precision from the graph, 2:4 credit only where due."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from mimc.errors import ConfigError
from mimc.deploy.onnx import export_onnx
from mimc.models.vit import build_encoder
from mimc.latency.devices import load_profile
from mimc.latency.roofline import is_nm_sparse, predict
from tests.conftest import tiny_config

K, N = 64, 32


def matmul_graph(path, weight: np.ndarray, dtype=TensorProto.FLOAT):
    """x (batch, K) @ W (K, N): one node whose FLOPs and bytes are known by hand."""
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    w = numpy_helper.from_array(weight.astype(np_dtype), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", dtype, ["batch", K])],
        [helper.make_tensor_value_info("y", dtype, ["batch", N])], initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def two_four(rng) -> np.ndarray:
    w = rng.standard_normal((K, N)).astype(np.float32)
    groups = w.reshape(K // 4, 4, N)
    groups[:, 2:, :] = 0  # keep 2 of every 4 along K, the reduction axis
    return groups.reshape(K, N)


@pytest.fixture
def toy_profile(tmp_path):
    data = {"name": "toy", "backend": "tensorrt", "precisions": ["fp32", "fp16", "int8"], "compute_capability": "8.0",
            "peak_tflops": {"fp32": 1e-3, "fp16": 4e-3, "int8": 8e-3}, "memory_bandwidth_gbs": 1.0, "memory_gb": 1,
            "sparse_tensor_cores": True}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(path)


def test_one_matmul_matches_the_hand_computation(tmp_path, toy_profile):
    rng = np.random.default_rng(0)
    path = matmul_graph(tmp_path / "mm.onnx", rng.standard_normal((K, N)))
    for batch in (1, 4096):
        r = predict(path, toy_profile, batch=batch)
        flops = 2 * batch * K * N
        nbytes = 4 * (batch * K + K * N + batch * N)
        expected = max(flops / 1e9, nbytes / 1e9)  # fp32 peak 1e-3 TFLOP/s, 1 GB/s
        assert r["label"] == "predicted"
        assert r["latency_ms"] == pytest.approx(expected * 1e3, rel=1e-9)
        assert r["throughput_per_s"] == pytest.approx(batch / expected, rel=1e-9)
        assert r["nodes"][0]["bound"] == ("compute" if flops / 1e9 > nbytes / 1e9 else "memory")
    # Small batch is memory-bound (weights dominate), a big one compute-bound.
    assert predict(path, toy_profile, batch=1)["bound"] == "memory"
    assert predict(path, toy_profile, batch=4096)["bound"] == "compute"


def test_precision_comes_from_the_graph_or_the_caller(tmp_path, toy_profile):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N))
    fp32 = predict(matmul_graph(tmp_path / "a.onnx", w), toy_profile, batch=4096)
    fp16 = predict(matmul_graph(tmp_path / "b.onnx", w, TensorProto.FLOAT16), toy_profile, batch=4096)
    assert (fp32["precision"], fp16["precision"]) == ("fp32", "fp16")
    assert fp16["latency_ms"] == pytest.approx(fp32["latency_ms"] / 4, rel=1e-9)  # compute-bound, 4x peak
    what_if = predict(tmp_path / "a.onnx", toy_profile, batch=4096, precision="int8")
    assert what_if["precision"] == "int8" and what_if["latency_ms"] < fp16["latency_ms"]
    with pytest.raises(ConfigError, match="has only fp32, fp16, int8") as info:
        predict(tmp_path / "a.onnx", toy_profile, precision="fp8")
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="unknown precision"):
        predict(tmp_path / "a.onnx", toy_profile, precision="fp4")


def test_int8_bf16_is_priced_as_its_int8_matmuls(tmp_path):
    """`mimc profile G --device openvino-cpu --predict --precision int8-bf16` (a precision the profile
    lists) was a KeyError traceback."""
    path, prof = matmul_graph(tmp_path / "mm.onnx", np.ones((K, N))), load_profile("openvino-cpu")
    r = predict(path, prof, batch=64, precision="int8-bf16")
    assert r["precision"] == "int8-bf16" and r["latency_ms"] == pytest.approx(predict(path, prof, batch=64, precision="int8")["latency_ms"])


def test_a_graph_with_nothing_to_price_has_no_throughput_and_stays_json(tmp_path, toy_profile):
    """A graph of views only (Identity) predicted 0 ms and throughput inf, which --json wrote as the
    non-JSON token Infinity."""
    import json

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "id.onnx"))
    r = predict(tmp_path / "id.onnx", toy_profile)
    assert r["latency_ms"] == 0 and r["throughput_per_s"] is None
    json.dumps(r, allow_nan=False)


def test_two_four_weights_are_credited_only_on_sparse_tensor_cores(tmp_path, toy_profile):
    rng = np.random.default_rng(0)
    sparse_w = two_four(rng)
    assert is_nm_sparse(sparse_w, axis=0) and not is_nm_sparse(sparse_w, axis=1)
    sparse = predict(matmul_graph(tmp_path / "s.onnx", sparse_w), toy_profile, batch=4096)
    dense = predict(matmul_graph(tmp_path / "d.onnx", rng.standard_normal((K, N))), toy_profile, batch=4096)
    assert sparse["sparse"]["credited_weights"] == 1 and dense["sparse"]["credited_weights"] == 0
    assert sparse["latency_ms"] == pytest.approx(dense["latency_ms"] / 2, rel=1e-6)  # compute-bound: 2x math
    no_sparse = toy_profile.__class__(**{**toy_profile.__dict__, "sparse_tensor_cores": False})
    assert predict(tmp_path / "s.onnx", no_sparse, batch=4096)["latency_ms"] == pytest.approx(dense["latency_ms"])


def test_manifest_nm_pattern_is_reported(tmp_path):
    from mimc.artifact import save_artifact

    save_artifact(build_encoder(tiny_config(nm_pattern="2:4"), seed=0), tmp_path / "art")  # a checked manifest
    path = matmul_graph(tmp_path / "art" / "m.onnx", two_four(np.random.default_rng(1)))
    r = predict(path, load_profile("t4"))
    assert r["sparse"]["manifest_nm_pattern"] == "2:4" and r["sparse"]["credited_weights"] == 0
    assert any("no sparse tensor cores" in n for n in r["notes"])
    assert predict(path, load_profile("h100"))["sparse"]["credited_weights"] == 1


def test_encoder_predictions_order_as_expected(tmp_path):
    full = tmp_path / "full.onnx"
    half = tmp_path / "half.onnx"
    export_onnx(build_encoder(tiny_config(), seed=0), full, batch="dynamic", validate=False)
    export_onnx(build_encoder(tiny_config(depth=2), seed=0), half, batch="dynamic", validate=False)
    h100, orin = load_profile("h100"), load_profile("jetson-orin")
    a, b = predict(full, h100, batch=8), predict(half, h100, batch=8)
    assert b["latency_ms"] < a["latency_ms"]
    assert a["latency_ms"] == pytest.approx(a["compute_bound_ms"] + a["memory_bound_ms"])
    assert a["latency_ms"] == pytest.approx(sum(r["time_us"] for r in a["nodes"]) / 1e3)
    assert predict(full, orin, batch=8)["latency_ms"] > a["latency_ms"]  # a slower device predicts slower
    assert a["by_op"]["MatMul"]["count"] == 6 * 4  # qkv, q@k, attn@v, proj, fc1, fc2 per block
    assert any("TF32" in n for n in a["notes"])


def fp8_graph(path):
    """x @ DequantizeLinear(W_fp8): an fp8 Q/DQ weight as mimc quantize --fp8 writes it (opset 19)."""
    w = onnx.TensorProto()
    w.name, w.data_type, w.raw_data = "W8", TensorProto.FLOAT8E4M3FN, bytes([0x38]) * (K * N)  # 1.0: dense
    w.dims.extend([K, N])
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = onnx.TensorProto()
    zero.name, zero.data_type, zero.raw_data = "z", TensorProto.FLOAT8E4M3FN, bytes(1)
    nodes = [helper.make_node("DequantizeLinear", ["W8", "s", "z"], ["W"], name="dq"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], initializer=[w, scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_fp8_graph_is_priced_at_fp8_and_refused_where_there_is_none(tmp_path):
    path = fp8_graph(tmp_path / "fp8.onnx")
    r = predict(path, load_profile("h100"), batch=8)
    assert r["graph_precision"] == "fp8" and r["nodes"][0]["precision"] == "fp8"
    assert r["nodes"][0]["bytes"] == pytest.approx(K * N * 1 + 4 * 8 * (K + N))  # weight read at 1 byte
    with pytest.raises(ConfigError, match="the graph carries fp8 but device 'a100'") as info:
        predict(path, load_profile("a100"))
    assert info.value.exit_code == 2
