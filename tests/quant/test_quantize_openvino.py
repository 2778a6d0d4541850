"""The openvino quantization target: what OpenVINO's execution graph runs in int8, u8 softmax
probabilities, the conv weights, the fidelity gate through OpenVINO, and the missing extra."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mimc.errors import ConfigError, MissingExtraError
from mimc.quant.quantize import QuantizeConfig, quantize_onnx
from tests.quant.test_quantize import graph, image_batches  # noqa: F401  (module fixture)


def _quantize(graph, tmp_path, name="model.int8.onnx", force=False, **options):
    path, enc = graph
    out = tmp_path / name
    report = quantize_onnx(path, out, image_batches(enc.config), QuantizeConfig(target="openvino", **options),
                           image_batches(enc.config, n=8, seed=1), force=force)
    return out, report, enc


def test_openvino_layout_runs_every_linear_and_the_patch_conv_in_int8(graph, tmp_path):
    pytest.importorskip("openvino")
    from mimc.runtime.openvino import compile_model, runtime_precision

    out, report, enc = _quantize(graph, tmp_path)
    depth = enc.config.depth
    assert report["target"] == "openvino" and report["quantized_linears"] == 4 * depth
    assert report["validation"]["passed"] and "OpenVINO" in report["runnable_note"]
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w_dq, x_dq = producer[conv.input[1]], producer[conv.input[0]]
    assert w_dq.op_type == x_dq.op_type == "DequantizeLinear"
    assert inits[w_dq.input[0]].dtype == np.int8 and next(a.i for a in w_dq.attribute if a.name == "axis") == 0
    assert inits[w_dq.input[1]].shape == (enc.config.dim,)  # one scale per output channel
    # OpenVINO's own execution graph: every compute layer int8, none left in f32.
    used = runtime_precision(compile_model(out, "fp32", threads=1))["compute_layers"]
    assert "f32" not in used and sum(used.values()) == 4 * depth + 1


def test_softmax_probabilities_are_u8_with_zero_point_zero(graph, tmp_path):
    pytest.importorskip("openvino")
    from mimc.runtime.openvino import compile_model, runtime_precision

    out, report, enc = _quantize(graph, tmp_path, quantize_attention_matmuls=True)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    of_softmax = [n for n in qs if (p := producer.get(n.input[0])) is not None and p.op_type == "Softmax"]
    assert len(of_softmax) == enc.config.depth == report["quantized_attention_matmuls"] // 2
    for n in qs:  # u8 exactly where the tensor is a probability, symmetric s8 elsewhere
        zp = inits[n.input[2]]
        assert (zp.dtype, int(zp)) == ((np.uint8, 0) if n in of_softmax else (np.int8, 0)), n.name
    used = runtime_precision(compile_model(out, "fp32", threads=1))["compute_layers"]
    assert "f32" not in used and sum(used.values()) == 6 * enc.config.depth + 1
    assert used.get("u8", 0) >= enc.config.depth  # attn @ v runs u8 x s8


def test_u8_probabilities_get_twice_the_levels_of_symmetric_s8(graph, tmp_path):
    """The reason for u8: calibrated on the same images, a softmax output's u8 step is half the
    tensorrt layout's s8 step (s8 spends half its levels on negative values that never occur)."""
    pytest.importorskip("openvino")
    path, enc = graph
    ov, _, _ = _quantize(graph, tmp_path, "ov.onnx", quantize_attention_matmuls=True)
    trt = tmp_path / "trt.onnx"
    quantize_onnx(path, trt, image_batches(enc.config), QuantizeConfig(target="tensorrt", quantize_attention_matmuls=True),
                  image_batches(enc.config, n=8, seed=1), force=True)

    def softmax_scales(g):
        model = onnx.load(str(g))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"
                and producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "Softmax"}

    u8, s8 = softmax_scales(ov), softmax_scales(trt)
    assert set(u8) == set(s8) and len(u8) == enc.config.depth
    for name in u8:
        assert u8[name] == pytest.approx(s8[name] * 127 / 255, rel=1e-6)


def test_gate_is_measured_through_openvino(graph, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import mimc.quant.gate as gate
    import mimc.quant.quantize as q

    seen = []
    real = gate.graph_outputs

    def spy(path, inputs, emulate_qdq=False, runtime="ort"):
        seen.append((path.name, runtime))
        return real(path, inputs, emulate_qdq, runtime)

    monkeypatch.setattr(gate, "graph_outputs", spy)
    monkeypatch.setattr(q, "graph_outputs", spy)
    _quantize(graph, tmp_path, overflow_fix="all")
    assert seen == [("model.onnx", "ort"), ("model.int8.onnx", "openvino")]  # the fp32 reference once, on ORT


def test_fp8_and_missing_openvino_are_refused_before_any_work(graph, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="FP8"):
        QuantizeConfig(target="openvino", precision="fp8")
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[openvino\]'"):
        _quantize(graph, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_device_openvino_cpu_picks_the_openvino_layout():
    from mimc.pipeline.graph_stages import target_for_device

    assert target_for_device("openvino-cpu", "int8") == "openvino"
    assert target_for_device("cpu", "int8") == "cpu"
    assert target_for_device("h100", "int8") == "tensorrt"


@pytest.mark.parametrize("vnni", [True, False])
def test_overflow_fix_follows_the_cpu_and_the_measurement(graph, tmp_path, monkeypatch, vnni):
    """7-bit weights where int16 pair sums would saturate: the conv always; without VNNI, every layer
    too when OpenVINO runs that layout more faithfully here (it does on this outlier encoder where
    the CPU lacks VNNI; on a VNNI CPU the all-layer SQNR is no better, so the mock cannot lie)."""
    pytest.importorskip("openvino")
    import mimc.runtime.openvino as mov

    monkeypatch.setattr(mov, "cpu_vnni", lambda: {"supported": vnni, "cpu_flags": []})
    out, report, enc = _quantize(graph, tmp_path)
    measured = report["overflow_fix_sqnr_db"]
    if vnni:
        assert report["overflow_fix"] == "first_layer" and measured is None
    else:
        assert set(measured) == {"first_layer", "all"}
        assert report["overflow_fix"] == max(measured, key=measured.get)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    conv = [w for w in weights if w.ndim == 4]
    linear = [w for w in weights if w.ndim == 2]
    assert len(conv) == 1 and np.abs(conv[0]).max() == 63
    assert max(int(np.abs(w).max()) for w in linear) == (63 if report["overflow_fix"] == "all" else 127)


def test_overflow_fix_is_an_openvino_option():
    with pytest.raises(ConfigError, match="overflow_fix"):
        QuantizeConfig(target="tensorrt", overflow_fix="all")
    assert QuantizeConfig(target="openvino", overflow_fix="none").resolved_overflow_fix == "none"
