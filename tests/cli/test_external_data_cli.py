"""Graphs past 2 GiB keep their weights in ``<graph>.data`` beside them: export -> validate ->
quantize -> profile -> eval on such graphs, and a tampered ``.data`` refused like a tampered graph.

A real one is a ViT-H/14 (2.5 GB, benchmarks/bench_big_encoders.py); here the threshold
``mimc.graph.files.EXTERNAL_DATA_BYTES`` is lowered so a tiny encoder takes exactly the same path.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mimc.artifact import MANIFEST_NAME, save_artifact, sha256_file
from mimc.data import deterministic_inputs
from mimc.models.vit import build_encoder
from mimc.runtime.session import run_onnx
from tests.cli.conftest import invoke, one_error_line
from tests.conftest import tiny_config


@pytest.fixture
def external(monkeypatch):
    """Every graph mimc writes keeps its weights in external data (as a ViT-H's must)."""
    monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 0)


@pytest.fixture
def art(tmp_path):
    return save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _flip_byte(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_quantize_profile_eval_with_external_data(app, art, calib, external):
    report = _json(invoke(app, ["export", art, "--json"]))
    graph, data = art / "model.onnx", art / "model.onnx.data"
    assert report["external_data"] == "model.onnx.data" and data.is_file()
    assert report["validation"]["passed"] and report["validation"]["fidelity"]["max_abs"] <= 1e-4
    assert report["bytes"] < report["external_data_bytes"] == data.stat().st_size  # the weights left the graph file
    entry = json.loads((art / MANIFEST_NAME).read_text())["files"]["model.onnx"]
    assert entry["external_data_sha256"] == sha256_file(data) and entry["sha256"] == sha256_file(graph)
    proto = onnx.load(str(graph), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.dims and np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    # ONNX Runtime reads the weights from beside the graph: the same outputs as torch on fresh inputs
    enc = build_encoder(tiny_config(), seed=0)
    x = deterministic_inputs(enc.config, batch=1, seed=11)
    with torch.no_grad():
        expected = enc(x).pooled.numpy()
    assert np.abs(run_onnx(graph, x)["pooled"] - expected).max() <= 1e-4

    q = _json(invoke(app, ["quantize", art, "--int8", "--calib", calib, "--n", "12", "--json"]))
    int8, int8_data = art / "model.int8.onnx", art / "model.int8.onnx.data"
    assert q["validation"]["passed"] and q["external_data"] == "model.int8.onnx.data" and int8_data.is_file()
    assert q["source"]["sha256"] == entry["sha256"] and q["fused_attention_blocks"] == 4
    int8_entry = json.loads((art / MANIFEST_NAME).read_text())["files"]["model.int8.onnx"]
    assert int8_entry["external_data_sha256"] == sha256_file(int8_data)
    ops = {n.op_type for n in onnx.load(str(int8), load_external_data=False).graph.node}
    assert {"QAttention", "MatMulIntegerToFloat"} <= ops

    for g in (graph, int8):
        prof = _json(invoke(app, ["profile", g, "--device", "cpu", "--iters", "2", "--warmup", "0", "--json"]))
        assert prof["label"] == "measured" and prof["results"][0]["p50_ms"] > 0
    predicted = _json(invoke(app, ["profile", graph, "--device", "h100", "--predict", "--json"]))  # a roofline from the dims alone
    assert predicted["label"] == "predicted" and predicted["results"][0]["latency_ms"] > 0
    ev = _json(invoke(app, ["eval", int8, "--ref", art, "--data", calib, "--json"]))
    assert ev["fidelity"]["pooled_cosine_mean"] >= 0.99
    assert sorted(p.name for p in art.iterdir()) == sorted(
        ["mimc.json", "model.safetensors", "model.onnx", "model.onnx.data", "model.int8.onnx", "model.int8.onnx.data"])


@pytest.mark.parametrize("target", ["model.onnx.data", "model.onnx"])
def test_a_tampered_graph_or_data_file_is_refused(app, art, calib, external, target):
    assert invoke(app, ["export", art]).exit_code == 0
    _flip_byte(art / target)
    before = sorted(p.name for p in art.iterdir())
    what = "external_data_sha256" if target.endswith(".data") else "the sha256"
    for args in (["profile", art / "model.onnx", "--iters", "1", "--warmup", "0"],
                 ["quantize", art / "model.onnx", "--calib", calib, "--n", "8", "-o", art / "q.onnx"],
                 ["eval", art / "model.onnx", "--data", calib],
                 ["profile", art / "model.onnx", "--device", "h100", "--predict"]):
        one_error_line(invoke(app, args), what)
    assert sorted(p.name for p in art.iterdir()) == before  # nothing written


def test_a_missing_data_file_is_refused(app, art, external):
    assert invoke(app, ["export", art]).exit_code == 0
    (art / "model.onnx.data").unlink()
    one_error_line(invoke(app, ["profile", art / "model.onnx", "--iters", "1"]), "missing")


def test_quantized_graph_is_the_same_whether_weights_were_inline_or_external(app, tmp_path, calib, monkeypatch):
    """The external-data path changes where bytes live, never what the graph computes."""
    outs = []
    for name, threshold in (("inline", 1 << 40), ("external", 0)):
        art = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / name)
        monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", threshold)
        assert invoke(app, ["export", art]).exit_code == 0
        monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 1 << 40)  # both int8 graphs inline, comparable
        assert invoke(app, ["quantize", art, "--calib", calib, "--n", "12", "--smooth", "0.5"]).exit_code == 0
        model = onnx.load(str(art / "model.int8.onnx"))
        del model.metadata_props[:]  # names the source graph's sha256, which differs
        outs.append(model.SerializeToString())
    assert (tmp_path / "external" / "model.onnx.data").is_file() and not (tmp_path / "inline" / "model.onnx.data").exists()
    assert outs[0] == outs[1]


def test_re_export_without_external_data_removes_the_old_data_file(app, art, monkeypatch):
    monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 0)
    assert invoke(app, ["export", art]).exit_code == 0 and (art / "model.onnx.data").is_file()
    monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 1 << 40)
    report = _json(invoke(app, ["export", art, "--json"]))
    assert report["external_data"] is None and not (art / "model.onnx.data").exists()
    assert invoke(app, ["profile", art / "model.onnx", "--iters", "1", "--warmup", "0"]).exit_code == 0


def test_a_symlinked_graph_quantizes(app, tmp_path, calib):
    """Weights inside a graph file are read from where that file really is."""
    from mimc.deploy.onnx import export_onnx

    real = tmp_path / "real"
    real.mkdir()
    export_onnx(build_encoder(tiny_config(), seed=0), real / "g.onnx")
    (tmp_path / "link.onnx").symlink_to(real / "g.onnx")
    q = _json(invoke(app, ["quantize", tmp_path / "link.onnx", "--calib", calib, "--n", "12", "--json"]))
    assert q["validation"]["passed"] and (tmp_path / "link.int8.onnx").is_file()
