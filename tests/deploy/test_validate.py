"""Fidelity of graph outputs (mimc.metrics.compare_outputs), per-precision gates and the ONNX Runtime runner."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, MissingExtraError, ValidationError
from mimc.deploy.validate import GATES, check_gate, gate_failures, verdict
from mimc.metrics import SQNR_CAP_DB, Fidelity, compare_outputs
from mimc.runtime import session
from mimc.runtime.session import run_onnx


def test_identical_outputs_are_perfect():
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    m = compare_outputs(x, x.copy())  # one 3-D output: token features
    assert m.max_abs == 0.0
    assert m.image_cosine_min == pytest.approx(1.0) and m.token_cosine_min == pytest.approx(1.0)
    assert m.worst_sqnr_db == SQNR_CAP_DB and m.pooled_cosine_mean is None


def test_sqnr_and_max_abs_follow_their_definitions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 50))
    noise = 0.05 * rng.standard_normal((4, 50))
    m = compare_outputs(ref, ref + noise)
    expected = 10 * math.log10(np.sum(ref**2) / np.sum(noise**2))
    assert m.sqnr_db == pytest.approx(expected, rel=1e-9)
    assert m.max_abs == pytest.approx(np.abs(noise).max())
    assert 0.99 < m.image_cosine_min < 1.0 and m.image_cosine_min == m.pooled_cosine_min


def test_cosine_reports_the_worst_sample():
    ref = np.random.default_rng(2).standard_normal((4, 16))
    cand = ref.copy()
    cand[2] = -cand[2]  # one sample flipped: a batch mean would still look fine
    m = compare_outputs(ref, cand)
    assert m.image_cosine_min == pytest.approx(-1.0) and m.pooled_cosine_min == pytest.approx(-1.0)
    assert m.pooled_cosine_mean == pytest.approx(0.5)


def test_named_outputs_torch_and_numpy_mix_and_worst_over_outputs():
    from mimc.models.vit import EncoderOutput

    hidden = torch.randn(2, 5, 8)
    pooled = torch.randn(2, 8)
    ref = EncoderOutput(hidden, pooled)
    cand = {"last_hidden_state": hidden.numpy(), "pooled": pooled.numpy() + 1e-3}
    m = compare_outputs(ref, cand)
    assert m.token_cosine_min == pytest.approx(1.0) and m.token_sqnr_db == SQNR_CAP_DB  # tokens agree exactly
    assert m.sqnr_db < SQNR_CAP_DB and m.worst_sqnr_db == m.sqnr_db  # the worst output sets the headline
    assert m.max_abs == pytest.approx(1e-3, rel=1e-3) and m.n_images == 2 and m.note is None


def test_token_cosine_is_per_token_and_image_cosine_per_image():
    ref = np.random.default_rng(3).standard_normal((2, 6, 4))
    cand = ref.copy()
    cand[0, 1] = -cand[0, 1]  # one token turned: the per-token minimum sees it, the per-image cosine less so
    m = compare_outputs({"last_hidden_state": ref}, {"last_hidden_state": cand})
    assert m.token_cosine_min == pytest.approx(-1.0)
    assert -1.0 < m.image_cosine_min < 1.0


def test_to_dict_is_one_spelling_and_rounds_cosines_only():
    m = compare_outputs({"pooled": np.ones((2, 3))}, {"pooled": np.ones((2, 3)) + 1e-7})
    d = m.to_dict()
    assert list(d) == ["pooled_cosine_mean", "pooled_cosine_min", "token_cosine_mean", "token_cosine_min", "image_cosine_min",
                       "sqnr_db", "token_sqnr_db", "max_abs", "ref_max_abs", "n_images", "note"]
    assert d["max_abs"] == pytest.approx(1e-7) and d["pooled_cosine_min"] == 1.0


def test_mismatched_outputs_are_refused():
    with pytest.raises(BadInputError, match="outputs differ"):
        compare_outputs({"a": np.ones(3)}, {"b": np.ones(3)})
    with pytest.raises(BadInputError, match="shape"):
        compare_outputs({"a": np.ones((2, 3))}, {"a": np.ones((3, 2))})


def _fid(max_abs, cosine, sqnr, ref_max_abs=None, token_sqnr=None) -> Fidelity:
    return Fidelity(image_cosine_min=cosine, pooled_cosine_min=cosine, sqnr_db=sqnr, token_sqnr_db=token_sqnr,
                    max_abs=max_abs, ref_max_abs=ref_max_abs, n_images=2)


def test_fp32_gate_absolute_and_relative():
    check_gate(_fid(5e-5, 1.0, 120.0, 3.0), "fp32")
    with pytest.raises(ValidationError, match="fp32"):
        check_gate(_fid(2e-4, 1.0, 90.0, 3.0), "fp32")
    # Large activations get a relative allowance (fp32 reordering noise scales with magnitude).
    big = GATES["fp32"].rel_abs * 1000.0
    assert not gate_failures(_fid(0.9 * big, 1.0, 90.0, 1000.0), "fp32")
    assert gate_failures(_fid(0.9 * big, 1.0, 90.0, 1.0), "fp32")


def test_nan_never_passes():
    nan = float("nan")
    for precision in GATES:
        assert gate_failures(_fid(nan, nan, nan, 1.0), precision)


def test_low_precision_gates_use_cosine_and_sqnr():
    good8 = _fid(0.5, 0.995, 25.0, 3.0)
    check_gate(good8, "int8")
    check_gate(good8, "fp8")
    with pytest.raises(ValidationError, match="SQNR"):
        check_gate(_fid(0.5, 0.995, 15.0, 3.0), "int8")
    with pytest.raises(ValidationError, match="SQNR"):  # the worst output is judged: tokens count too
        check_gate(_fid(0.5, 0.995, 25.0, 3.0, token_sqnr=15.0), "int8")
    with pytest.raises(ValidationError, match="cosine"):
        check_gate(_fid(0.5, 0.95, 25.0, 3.0), "int8")
    check_gate(_fid(0.01, 0.9995, 35.0), "fp16")  # abs error is not gated in fp16
    with pytest.raises(ValidationError):
        check_gate(_fid(0.01, 0.99, 35.0), "fp16")
    with pytest.raises(ValidationError, match="not measured"):
        check_gate(Fidelity(sqnr_db=35.0, n_images=1), "fp16")
    v = verdict(good8, "int8")
    assert v["passed"] and not v["forced"] and v["gate"]["precision"] == "int8" and v["fidelity"] == good8.to_dict()
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
    sess = session.make_session(path)
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
    assert session.resolve_providers(None) == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in session.resolve_providers("auto")


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[cpu\]'"):
        session.onnxruntime()


def test_sessions_do_not_spin():
    so = session.session_options(threads=2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2
