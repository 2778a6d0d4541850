"""`mimc quantize`: artifact -> export -> int8 graph recorded in mimc.json; bad inputs exit 2, write nothing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from mimc.artifact import MANIFEST_NAME, save_artifact
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config
from tests.cli.conftest import invoke, one_error_line


@pytest.fixture
def artifact(tmp_path):
    return save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")




def _snapshot(folder):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def test_quantize_artifact_exports_then_quantizes_and_records(app, artifact, calib):
    result = invoke(app, ["quantize", artifact, "--int8", "--calib", calib, "--n", "16", "--smooth", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = artifact / "model.int8.onnx"
    assert (artifact / "model.onnx").is_file() and out.is_file()
    assert report["calibration_images"] == 16 and report["held_out_images"] == 8  # 24 images: the other 8 held out
    assert report["validation"]["passed"] and report["validation"]["inputs"] == "held-out images"
    entry = json.loads((artifact / MANIFEST_NAME).read_text())["files"]["model.int8.onnx"]
    assert entry["precision"] == "int8" and entry["method"] == "percentile" and entry["n"] == 16
    assert entry["calibration_sha256"] == report["calibration_sha256"] and len(entry["calibration_sha256"]) == 64
    assert entry["smoothing"] == {"smooth_alpha": 0.5, "repq": False}
    assert entry["stage"]["name"] == "quantize" and entry["stage"]["metrics"]["validation"]["fidelity"]["image_cosine_min"] >= 0.99
    assert {p.key for p in onnx.load(str(out)).metadata_props} >= {"mimc_version", "mimc_quantization"}
    assert report["fused_attention_blocks"] == 4 and entry["stage"]["config"]["fuse_attention"] is True


def test_no_fuse_attention_keeps_the_float_attention_nodes(app, artifact, calib):
    result = invoke(app, ["quantize", artifact, "--calib", calib, "--n", "16", "--no-fuse-attention", "-o", artifact / "plain.onnx"])
    assert result.exit_code == 0, result.output
    assert "QAttention" not in result.stdout
    ops = {n.op_type for n in onnx.load(str(artifact / "plain.onnx")).graph.node}
    assert "QAttention" not in ops and "Softmax" in ops


def test_fp8_for_an_h100_says_it_cannot_run_here(app, artifact, calib):
    result = invoke(app, ["quantize", artifact, "--fp8", "--calib", calib, "--n", "16", "--device", "h100"])
    assert result.exit_code == 0, result.output
    assert (artifact / "model.fp8.onnx").is_file()
    assert "not runnable here" in result.stderr


def test_bad_inputs_exit_2_and_write_nothing(app, artifact, calib, tmp_path):
    before = _snapshot(artifact)
    one_error_line(invoke(app, ["quantize", artifact]), "calibration images")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    one_error_line(invoke(app, ["quantize", artifact, "--calib", wrong]), "expects (3, 32, 32)")
    two_channel = tmp_path / "two.npz"
    np.savez(two_channel, images=np.zeros((4, 32, 32, 2), dtype=np.uint8))
    one_error_line(invoke(app, ["quantize", artifact, "--calib", two_channel]), "channels")
    one_error_line(invoke(app, ["quantize", artifact, "--calib", calib, "-o", tmp_path / "nope" / "q.onnx"]), "does not exist")
    one_error_line(invoke(app, ["quantize", artifact, "--fp8", "--calib", calib]), "does not support fp8")
    one_error_line(invoke(app, ["quantize", artifact, "--int8", "--fp8", "--calib", calib]), "exclude each other")
    # a graph of another model into this artifact would be listed in its mimc.json as its own
    other = save_artifact(build_encoder(tiny_config(), seed=1), tmp_path / "other")
    for model in ("ref", other):
        one_error_line(invoke(app, ["quantize", model, "--calib", calib, "-o", artifact / "q.onnx"]), "inside the artifact")
    assert _snapshot(artifact) == before


def test_foreign_onnx_is_refused(app, artifact, calib, tmp_path):
    assert invoke(app, ["export", artifact]).exit_code == 0
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    model = onnx.load(str(artifact / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(foreign_dir / "model.onnx"))
    one_error_line(invoke(app, ["quantize", foreign_dir / "model.onnx", "--calib", calib]), "not a mimc graph")
    assert [p.name for p in foreign_dir.iterdir()] == ["model.onnx"]
    # A mimc graph copied out of its artifact still carries its metadata and quantizes.
    shutil.copy(artifact / "model.onnx", tmp_path / "loose.onnx")
    result = invoke(app, ["quantize", tmp_path / "loose.onnx", "--calib", calib, "--n", "8", "--method", "minmax"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "loose.int8.onnx").is_file()


def test_an_existing_file_outside_an_artifact_is_replaced_only_with_overwrite(app, artifact, calib, tmp_path):
    # -o q.onnx over a file of the user's replaced it silently, where embed, export and prune refuse an existing output
    taken = tmp_path / "q.onnx"
    taken.write_text("mine")
    args = ["quantize", artifact, "--calib", calib, "--n", "8", "-o", taken]
    result = invoke(app, args)
    one_error_line(result, "q.onnx already exists")
    assert "--overwrite" in result.stderr and taken.read_text() == "mine"
    assert invoke(app, [*args, "--overwrite"]).exit_code == 0 and onnx.load(str(taken)).graph.node


def test_any_model_becomes_an_artifact_with_both_graphs(app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(app, ["quantize", "ref", "--calib", "builtin", "--n", "16", "--method", "minmax", "--json"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ref-mimc"
    assert sorted(p.name for p in out.iterdir()) == ["mimc.json", "model.int8.onnx", "model.onnx", "model.safetensors"]
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert files["model.int8.onnx"]["held_out_images"] == 32 and files["model.int8.onnx"]["validation"]["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["ref-mimc"]  # no temp dirs left
    one_error_line(invoke(app, ["quantize", "ref", "--calib", "builtin"]), "already exists")


def test_videomae_converted_artifact_quantizes(app, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from mimc.models.convert.hf import convert_hf_model

    torch.manual_seed(0)
    hf = transformers.VideoMAEModel(transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, use_mean_pooling=True)).eval()
    art = save_artifact(convert_hf_model(hf), tmp_path / "video")
    clips = np.random.default_rng(0).integers(0, 256, (20, 4, 32, 32, 3), dtype=np.uint8)  # raw RGB clips
    np.savez(tmp_path / "clips.npz", images=clips)
    result = invoke(app, ["quantize", art, "--calib", tmp_path / "clips.npz", "--n", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantized_linears"] == 8 and report["validation"]["passed"]
    assert json.loads((art / MANIFEST_NAME).read_text())["files"]["model.int8.onnx"]["precision"] == "int8"


def test_device_openvino_cpu_writes_the_openvino_layout_and_builds_an_int8_ir(app, artifact, calib):
    pytest.importorskip("openvino")
    result = invoke(app, ["quantize", artifact, "--calib", calib, "--n", "16", "--device", "openvino-cpu", "--overflow-fix", "all",
                          "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target"] == "openvino" and report["overflow_fix"] == "all" and report["quantized_convs"] == 1
    assert report["overflow_fix_sqnr_db"] is None  # asked for: one layout built, nothing chosen
    ir = artifact / "model.int8.xml"
    built = invoke(app, ["build", artifact / "model.int8.onnx", "--device", "openvino-cpu", "-o", ir, "--json"])
    assert built.exit_code == 0, built.output
    layers = json.loads((artifact / "model.int8.xml.json").read_text())["runtime_precision"]["compute_layers"]
    assert "f32" not in layers and sum(layers.values()) == 4 * 4 + 1  # every linear and the patch conv in int8


def test_overflow_fix_outside_openvino_names_the_flag(app, artifact, calib):
    result = invoke(app, ["quantize", artifact, "--calib", calib, "--n", "16", "--overflow-fix", "all"])
    one_error_line(result, "--overflow-fix")
    assert not (artifact / "model.int8.onnx").exists()


def test_re_quantizing_a_graph_something_was_built_from_needs_overwrite_and_removes_it(app, artifact, calib):
    # a second quantize replaced model.int8.onnx and left the IR built from the first one listed as current
    pytest.importorskip("openvino")
    from tests.cli.conftest import snapshot

    plain = ["quantize", artifact, "--calib", calib, "--n", "16", "--no-fuse-attention"]
    assert invoke(app, plain).exit_code == 0
    assert invoke(app, ["build", artifact / "model.int8.onnx", "--device", "openvino-cpu"]).exit_code == 0
    before = snapshot(artifact)
    for again in ([*plain, "--method", "minmax"], ["quantize", artifact / "model.onnx", *plain[2:], "--method", "minmax"]):
        result = invoke(app, again)
        one_error_line(result, "has graphs made from it (openvino-cpu-int8.xml)")
        assert "--overwrite" in result.stderr and snapshot(artifact) == before  # nothing changed
    result = invoke(app, [*plain, "--method", "minmax", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((artifact / MANIFEST_NAME).read_text())["files"]) == ["model.int8.onnx", "model.onnx"]
    assert not list(artifact.glob("openvino-cpu-int8.*"))
    assert invoke(app, [*plain, "--method", "minmax"]).exit_code == 0  # nothing made from it: replaced as before
