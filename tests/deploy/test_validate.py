"""Fidelity metrics, per-precision gates and the ONNX Runtime runner."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, MissingExtraError, ValidationError
from mimc.deploy import validate
from mimc.deploy.validate import GATES, SQNR_CAP_DB, check_gate, compare_outputs, gate_failures, run_onnx


def test_identical_outputs_are_perfect():
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    m = compare_outputs(x, x.copy())
    assert m["max_abs"] == 0.0
    assert m["cosine"] == pytest.approx(1.0)
    assert m["sqnr_db"] == SQNR_CAP_DB


def test_sqnr_and_max_abs_follow_their_definitions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 50))
    noise = 0.05 * rng.standard_normal((4, 50))
    m = compare_outputs(ref, ref + noise)
    expected = 10 * math.log10(np.sum(ref**2) / np.sum(noise**2))
    assert m["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert m["max_abs"] == pytest.approx(np.abs(noise).max())
    assert 0.99 < m["cosine"] < 1.0


def test_cosine_reports_the_worst_sample():
    ref = np.random.default_rng(2).standard_normal((4, 16))
    cand = ref.copy()
    cand[2] = -cand[2]  # one sample flipped: a batch mean would still look fine
    assert compare_outputs(ref, cand)["cosine"] == pytest.approx(-1.0)


def test_named_outputs_torch_and_numpy_mix_and_worst_over_outputs():
    from mimc.models.vit import EncoderOutput

    hidden = torch.randn(2, 5, 8)
    pooled = torch.randn(2, 8)
    ref = EncoderOutput(hidden, pooled)
    cand = {"last_hidden_state": hidden.numpy(), "pooled": pooled.numpy() + 1e-3}
    m = compare_outputs(ref, cand)
    assert set(m["outputs"]) == {"last_hidden_state", "pooled"}
    assert m["outputs"]["last_hidden_state"]["max_abs"] == 0.0
    assert m["max_abs"] == pytest.approx(1e-3, rel=1e-3)  # the worst output sets the headline


def test_mismatched_outputs_are_refused():
    with pytest.raises(BadInputError, match="outputs differ"):
        compare_outputs({"a": np.ones(3)}, {"b": np.ones(3)})
    with pytest.raises(BadInputError, match="shape"):
        compare_outputs({"a": np.ones((2, 3))}, {"a": np.ones((3, 2))})


def test_fp32_gate_absolute_and_relative():
    check_gate({"max_abs": 5e-5, "cosine": 1.0, "sqnr_db": 120.0, "ref_max_abs": 3.0}, "fp32")
    with pytest.raises(ValidationError, match="fp32"):
        check_gate({"max_abs": 2e-4, "cosine": 1.0, "sqnr_db": 90.0, "ref_max_abs": 3.0}, "fp32")
    # Large activations get a relative allowance (fp32 reordering noise scales with magnitude).
    big = GATES["fp32"].rel_abs * 1000.0
    assert not gate_failures({"max_abs": 0.9 * big, "cosine": 1.0, "sqnr_db": 90.0, "ref_max_abs": 1000.0}, "fp32")
    assert gate_failures({"max_abs": 0.9 * big, "cosine": 1.0, "sqnr_db": 90.0, "ref_max_abs": 1.0}, "fp32")


def test_nan_never_passes():
    nan = float("nan")
    for precision in GATES:
        assert gate_failures({"max_abs": nan, "cosine": nan, "sqnr_db": nan, "ref_max_abs": 1.0}, precision)


def test_low_precision_gates_use_cosine_and_sqnr():
    good8 = {"max_abs": 0.5, "cosine": 0.995, "sqnr_db": 25.0, "ref_max_abs": 3.0}
    check_gate(good8, "int8")
    check_gate(good8, "fp8")
    with pytest.raises(ValidationError, match="SQNR"):
        check_gate({**good8, "sqnr_db": 15.0}, "int8")
    with pytest.raises(ValidationError, match="cosine"):
        check_gate({**good8, "cosine": 0.95}, "int8")
    check_gate({"max_abs": 0.01, "cosine": 0.9995, "sqnr_db": 35.0}, "fp16")  # abs error is not gated in fp16
    with pytest.raises(ValidationError):
        check_gate({"max_abs": 0.01, "cosine": 0.99, "sqnr_db": 35.0}, "fp16")
    with pytest.raises(ConfigError, match="unknown precision"):
        check_gate(good8, "int3")


def _add_one_graph(path, shape=(None, 3)):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add", [x], [y], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_run_onnx_array_mapping_and_session_reuse(tmp_path):
    path = _add_one_graph(tmp_path / "add.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = run_onnx(path, x)
    np.testing.assert_array_equal(out["y"], x + 1)
    sess = validate.make_session(path)
    np.testing.assert_array_equal(run_onnx(sess, {"x": torch.from_numpy(x)})["y"], x + 1)
    with pytest.raises(BadInputError, match="inputs"):
        run_onnx(path, {"wrong": x})


def test_run_onnx_bad_files_and_providers(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        run_onnx(tmp_path / "missing.onnx", np.zeros((1, 3), np.float32))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(BadInputError, match="cannot load"):
        run_onnx(junk, np.zeros((1, 3), np.float32))
    path = _add_one_graph(tmp_path / "add.onnx")
    with pytest.raises(DeviceUnavailableError, match="not available"):
        run_onnx(path, np.zeros((1, 3), np.float32), providers=["NoSuchExecutionProvider"])
    assert validate.resolve_providers(None) == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in validate.resolve_providers("auto")


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[cpu\]'"):
        validate.onnxruntime()


def test_sessions_do_not_spin():
    so = validate.session_options(threads=2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2
