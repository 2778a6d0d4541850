"""ONNX export: every encoder shape matches torch on ONNX Runtime; refusals leave nothing behind."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mimc.artifact import MANIFEST_NAME, manifest_sha256, save_artifact, sha256_file, state_hash
from mimc.models.io import load_artifact
from mimc.data import deterministic_inputs
from mimc.errors import BadInputError, ConfigError, ValidationError
from mimc.deploy import onnx as export_mod
from mimc.deploy.onnx import check_deployable, export_onnx
from mimc.runtime.session import run_onnx
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config, tiny_video_config

CONFIGS = {
    "plain": lambda: tiny_config(),
    "relpos_layerscale": lambda: tiny_config(rel_pos_bias="per_block", layer_scale=True, pooling="cls"),
    "shared_relpos": lambda: tiny_config(rel_pos_bias="shared", pos_embed="none", pool_norm=True, final_norm=False),
    "video": lambda: tiny_video_config(),
}


def _torch_out(encoder, x):
    with torch.no_grad():
        out = encoder(x)
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled": out.pooled.numpy()}


def _leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_matches_torch_on_ort(tmp_path, name):
    cfg = CONFIGS[name]()
    encoder = build_encoder(cfg, seed=0)
    path = tmp_path / "model.onnx"
    report = export_onnx(encoder, path)
    assert report["validation"]["passed"] and report["validation"]["fidelity"]["max_abs"] <= 1e-4

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17 and report["opset"] == 17
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooled"]
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops  # opset 17 keeps it one node (TensorRT/ORT fuse it)
    assert not ops & export_mod.TRAINING_ONLY_OPS
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["mimc_encoder_config"]) == cfg.to_dict()

    # Independent check on inputs the export never saw.
    x = deterministic_inputs(cfg, batch=1, seed=7)
    out = run_onnx(path, x)
    ref = _torch_out(encoder, x)
    for key in ref:
        assert out[key].shape == ref[key].shape
        assert np.abs(out[key] - ref[key]).max() <= 1e-4


def test_dynamic_batch_runs_at_batch_three(tmp_path):
    cfg = tiny_config(rel_pos_bias="per_block", layer_scale=True)
    encoder = build_encoder(cfg, seed=1)
    path = tmp_path / "dyn.onnx"
    report = export_onnx(encoder, path, batch="dynamic")
    assert report["batch"] == "dynamic" and report["inputs"]["pixel_values"][0] == "batch"
    assert "batch=2" in report["validation"]["inputs"]
    x = deterministic_inputs(cfg, batch=3, seed=3)
    out = run_onnx(path, x)
    ref = _torch_out(encoder, x)
    assert out["pooled"].shape == (3, cfg.dim)
    assert max(np.abs(out[k] - ref[k]).max() for k in ref) <= 1e-4


def test_static_batch_is_baked_in(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "b2.onnx"
    export_onnx(build_encoder(cfg, seed=0), path, batch=2)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, *cfg.input_shape]


@pytest.mark.slow
def test_dynamo_exporter_also_matches(tmp_path):
    cfg = tiny_config(rel_pos_bias="per_block", layer_scale=True)
    encoder = build_encoder(cfg, seed=0)
    report = export_onnx(encoder, tmp_path / "d.onnx", exporter="dynamo")
    assert report["exporter"] == "dynamo" and report["opset"] >= 18  # dynamo implements opset >= 18 only
    assert report["validation"]["passed"]


def test_gate_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("mimc.deploy.validate.gate_failures", lambda metrics, precision: ["max abs error 1 > 1e-4"])
    encoder = build_encoder(tiny_config(), seed=0)
    with pytest.raises(ValidationError, match="nothing written"):
        export_onnx(encoder, tmp_path / "model.onnx")
    assert _leftovers(tmp_path) == []


def test_force_keeps_a_failing_graph_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("mimc.deploy.validate.gate_failures", lambda metrics, precision: ["max abs error 1 > 1e-4"])
    report = export_onnx(build_encoder(tiny_config(), seed=0), tmp_path / "model.onnx", force=True)
    assert (tmp_path / "model.onnx").is_file()
    assert report["validation"]["passed"] is False and report["validation"]["forced"] is True
    assert _leftovers(tmp_path) == ["model.onnx"]


def test_manifest_records_validation(tmp_path):
    art = tmp_path / "art"
    save_artifact(build_encoder(tiny_config(layer_scale=True), seed=0), art)
    encoder = load_artifact(art)
    export_onnx(encoder, art / "model.onnx")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    entry = manifest["files"]["model.onnx"]
    assert entry["sha256"] == sha256_file(art / "model.onnx")
    v = entry["validation"]
    f = v["fidelity"]
    assert f["max_abs"] <= 1e-4 and f["image_cosine_min"] > 0.9999 and f["sqnr_db"] > 60 and f["token_sqnr_db"] > 60 and v["passed"]
    assert "path" not in entry  # relative to the artifact, which may move
    assert load_artifact(art).manifest.files["model.onnx"]["opset"] == 17  # still a loadable manifest


def test_refuses_to_record_other_weights_in_an_artifact(tmp_path):
    art = tmp_path / "art"
    save_artifact(build_encoder(tiny_config(), seed=0), art)
    before = (art / MANIFEST_NAME).read_text()
    stranger = build_encoder(tiny_config(), seed=1)
    with pytest.raises(BadInputError, match="different weights"):
        export_onnx(stranger, art / "model.onnx")
    assert _leftovers(art) == sorted([MANIFEST_NAME, "model.safetensors"])
    assert (art / MANIFEST_NAME).read_text() == before


def test_input_encoder_is_untouched(tmp_path):
    encoder = build_encoder(tiny_config(), seed=0).train()
    before = state_hash(encoder)
    export_onnx(encoder, tmp_path / "m.onnx")
    assert encoder.training and state_hash(encoder) == before


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch": 0}, ConfigError, "positive"),
        ({"batch": "abc"}, ConfigError, "dynamic"),
        ({"batch": 10 ** 9}, ConfigError, "4096"),  # was a torch allocation traceback (or the OOM killer below it)
        ({"opset": 16}, ConfigError, "opset"),
        ({"opset": 21}, ConfigError, "dynamo"),
        ({"exporter": "tracer"}, ConfigError, "exporter"),
        ({"precision": "int3"}, ConfigError, "precision"),
        ({"validate": False, "force": True}, ConfigError, "force"),  # no gate to keep a failing graph past: was ignored
    ],
)
def test_bad_options_are_refused_before_writing(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(build_encoder(tiny_config(), seed=0), tmp_path / "m.onnx", **kwargs)
    assert _leftovers(tmp_path) == []


def test_bad_destinations(tmp_path):
    encoder = build_encoder(tiny_config(), seed=0)
    with pytest.raises(BadInputError, match=".onnx"):
        export_onnx(encoder, tmp_path / "model.txt")
    with pytest.raises(BadInputError, match="does not exist"):
        export_onnx(encoder, tmp_path / "nope" / "model.onnx")


def test_broken_weights_are_refused(tmp_path):
    encoder = build_encoder(tiny_config(), seed=0)
    with torch.no_grad():
        encoder.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(BadInputError, match="NaN"):
        export_onnx(encoder, tmp_path / "m.onnx")


def test_training_only_ops_are_rejected():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Dropout", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(ValidationError, match="Dropout"):
        check_deployable(helper.make_model(graph))


def test_huge_graphs_keep_weights_beside_them(tmp_path, monkeypatch):
    # Protobuf caps a file at 2 GiB; pretend this tiny model is past the threshold.
    monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 0)
    cfg = tiny_config()
    encoder = build_encoder(cfg, seed=0)
    report = export_onnx(encoder, tmp_path / "model.onnx")
    assert report["external_data"] == "model.onnx.data" and report["validation"]["passed"]
    assert _leftovers(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert report["external_data_bytes"] > report["bytes"]  # the weights moved out of the graph file
    x = deterministic_inputs(cfg, batch=1, seed=5)
    assert np.abs(run_onnx(tmp_path / "model.onnx", x)["pooled"] - _torch_out(encoder, x)["pooled"]).max() <= 1e-4


@pytest.mark.parametrize("method_options", [{"method": "tome", "r": 3}, {"method": "topk", "keep": 0.5, "at": (2,)}])
def test_token_reduced_encoders_export(tmp_path, method_options):
    from mimc.compression.registry import compress
    from mimc.compression.tokens import TokenReductionConfig

    cfg = tiny_config()
    reduced, _ = compress(build_encoder(cfg, seed=0), TokenReductionConfig(**method_options))
    report = export_onnx(reduced, tmp_path / "tok.onnx", batch="dynamic")
    assert report["validation"]["passed"]
    tokens = report["outputs"]["last_hidden_state"][1]  # read from the graph, not the config
    assert isinstance(tokens, int) and tokens < cfg.num_tokens
    x = deterministic_inputs(cfg, batch=3, seed=4)
    out, ref = run_onnx(tmp_path / "tok.onnx", x), _torch_out(reduced, x)
    assert out["last_hidden_state"].shape == ref["last_hidden_state"].shape == (3, tokens, cfg.dim)
    assert max(np.abs(out[k] - ref[k]).max() for k in ref) <= 1e-4


def test_export_records_the_graph_before_it_appears_and_sweeps_a_killed_exports_temps(tmp_path, monkeypatch):
    import json
    import os

    import mimc.deploy.onnx as onnx_mod
    from mimc.artifact import MANIFEST_NAME, save_artifact
    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    enc = build_encoder(tiny_config(), seed=0)
    art = save_artifact(enc, tmp_path / "art")
    stale = art / ".model.onnx.999999999.deadbeef.tmp"  # a killed export's folder: its pid does not exist
    stale.mkdir()
    real_replace = os.replace

    def killed(src, dst):  # the process dies just as the graph would move into place
        if str(dst).endswith("model.onnx"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        onnx_mod.export_onnx(enc, art / "model.onnx")
    assert not stale.exists()
    assert "model.onnx" in json.loads((art / MANIFEST_NAME).read_text())["files"]  # recorded first
    assert not (art / "model.onnx").exists()  # never a graph its artifact does not describe
    monkeypatch.setattr(onnx_mod.os, "replace", real_replace)
    onnx_mod.export_onnx(enc, art / "model.onnx")
    assert (art / "model.onnx").is_file() and not [p for p in art.iterdir() if p.name.startswith(".")]


def test_a_graph_its_artifact_does_not_list_is_refused(tmp_path):
    # a swapped model.onnx was refused by its recorded sha256, but deleting its entry from mimc.json
    # (or dropping another graph into the folder) made it run with the artifact's input spec unchecked
    from mimc.errors import NotAModelError
    from mimc.latency.run import profile
    from mimc.runtime.onnx_model import OnnxModel

    art = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")
    export_onnx(load_artifact(art), art / "model.onnx")
    export_onnx(build_encoder(tiny_config(depth=2), seed=1), tmp_path / "other.onnx", validate=False)
    (art / "model.onnx").write_bytes((tmp_path / "other.onnx").read_bytes())
    (art / "extra.onnx").write_bytes((tmp_path / "other.onnx").read_bytes())
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    del manifest["files"]["model.onnx"]
    manifest["manifest_sha256"] = manifest_sha256(manifest)  # re-hashed: the check behind the hash
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    for graph in ("model.onnx", "extra.onnx"):
        with pytest.raises(NotAModelError, match="does not list it"):
            OnnxModel(art / graph)
        with pytest.raises(NotAModelError, match="does not list it"):
            profile(art / graph, device="cpu", iters=1, warmup=0)


@pytest.mark.parametrize("removed", [("external_data_sha256",), ("external_data", "external_data_sha256")])
def test_an_altered_data_file_is_refused_with_its_hash_removed_from_the_manifest(tmp_path, monkeypatch, removed):
    # the .data check ran only when mimc.json still held external_data and its sha256: deleting them
    # let altered weights run under the graph's recorded (and matching) sha256
    from mimc.errors import NotAModelError
    from mimc.runtime.onnx_model import OnnxModel

    monkeypatch.setattr("mimc.graph.files.EXTERNAL_DATA_BYTES", 0)
    art = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")
    export_onnx(load_artifact(art), art / "model.onnx")
    data = art / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    for key in removed:
        del manifest["files"]["model.onnx"][key]
    manifest["manifest_sha256"] = manifest_sha256(manifest)  # re-hashed: the check behind the hash
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(NotAModelError, match="external_data_sha256"):
        OnnxModel(art / "model.onnx")
