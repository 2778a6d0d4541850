"""`mimc export` and `mimc profile`: happy paths and every bad input (exit 2, one line, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import mimc
from mimc.artifact import MANIFEST_NAME, is_artifact, manifest_sha256, save_artifact
from mimc.models.io import load_artifact
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config
from tests.cli.conftest import invoke, one_error_line, snapshot


@pytest.fixture
def artifact(tmp_path):
    return save_artifact(build_encoder(tiny_config(rel_pos_bias="per_block", layer_scale=True), seed=0), tmp_path / "art")




def test_export_artifact_in_place(app, artifact):
    result = invoke(app, ["export", artifact, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"].endswith("model.onnx") and (artifact / "model.onnx").is_file()
    assert report["validation"]["passed"] and report["validation"]["fidelity"]["max_abs"] <= 1e-4
    files = json.loads((artifact / MANIFEST_NAME).read_text())["files"]
    assert files["model.onnx"]["sha256"] == report["sha256"]


def test_re_export_over_graphs_made_from_model_onnx_needs_overwrite_and_removes_them(app, artifact, calib):
    assert invoke(app, ["export", artifact]).exit_code == 0
    assert invoke(app, ["quantize", artifact, "--calib", calib]).exit_code == 0
    before = snapshot(artifact)
    result = invoke(app, ["export", artifact, "--batch", "dynamic"])
    one_error_line(result, "has graphs made from it (model.int8.onnx)")
    assert "--overwrite" in result.stderr and snapshot(artifact) == before  # nothing changed
    result = invoke(app, ["export", artifact, "--batch", "dynamic", "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads((artifact / MANIFEST_NAME).read_text())["files"]
    assert list(files) == ["model.onnx"] and files["model.onnx"]["batch"] == "dynamic"
    assert not (artifact / "model.int8.onnx").exists()
    assert invoke(app, ["export", artifact, "--batch", "1"]).exit_code == 0  # nothing made from it: replaced as before


def test_export_any_model_creates_an_artifact_beside_the_graph(app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(app, ["export", "ref", "--batch", "dynamic", "--json"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ref-mimc"  # derived default: ./<slug>-mimc
    assert is_artifact(out) and (out / "model.onnx").is_file()
    loaded = load_artifact(out)
    assert loaded.manifest.source["id"] == "ref"
    assert loaded.manifest.files["model.onnx"]["batch"] == "dynamic"
    assert [p.name for p in tmp_path.iterdir()] == ["ref-mimc"]  # no temp dirs left


def test_export_to_another_artifact_dir(app, tmp_path, artifact):
    from mimc.atomic import write_json

    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["files"]["model.int8.onnx"] = {"kind": "onnx"}  # a file that stays behind in the source
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    write_json(artifact / MANIFEST_NAME, manifest)
    out = tmp_path / "copy"
    result = invoke(app, ["export", artifact, "-o", out, "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and not (artifact / "model.onnx").exists()
    copied = load_artifact(out).manifest
    assert list(copied.files) == ["model.onnx"] and copied.files["model.onnx"]["batch"] == 2


@pytest.mark.parametrize(
    "args, match",
    [
        (["--batch", "0"], "batch"),
        (["--batch", "many"], "dynamic"),
        (["--opset", "13"], "opset"),
        (["--exporter", "tracer"], "exporter"),
    ],
)
def test_export_bad_options(app, artifact, args, match):
    before = sorted(p.name for p in artifact.iterdir())
    manifest = (artifact / MANIFEST_NAME).read_text()
    one_error_line(invoke(app, ["export", artifact, *args]), match, code=2)
    assert sorted(p.name for p in artifact.iterdir()) == before
    assert (artifact / MANIFEST_NAME).read_text() == manifest


def test_export_bad_models(app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(invoke(app, ["export", tmp_path / "missing"]), "not found", code=2)
    (tmp_path / "empty").mkdir()
    one_error_line(invoke(app, ["export", tmp_path / "empty"]), "neither a mimc artifact", code=2)
    corrupt = tmp_path / "corrupt"
    save_artifact(build_encoder(tiny_config(), seed=0), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    one_error_line(invoke(app, ["export", corrupt]), "safetensors", code=2)
    assert not (corrupt / "model.onnx").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("keep me")
    one_error_line(invoke(app, ["export", "ref", "-o", occupied]), "already exists", code=2)
    assert [p.name for p in occupied.iterdir()] == ["x"]


def test_export_failing_the_gate_exits_1_and_writes_nothing(app, tmp_path, artifact, monkeypatch):
    from mimc.deploy import validate

    monkeypatch.setattr(validate, "gate_failures", lambda metrics, precision: ["max abs error 1 > 1e-4"])
    manifest = (artifact / MANIFEST_NAME).read_text()
    one_error_line(invoke(app, ["export", artifact]), "fidelity gate", code=1)
    assert not (artifact / "model.onnx").exists() and (artifact / MANIFEST_NAME).read_text() == manifest
    out = tmp_path / "new"
    one_error_line(invoke(app, ["export", artifact, "-o", out]), "nothing written", code=1)
    assert not out.exists()
    forced = invoke(app, ["export", artifact, "--force", "--json"])
    assert forced.exit_code == 0 and json.loads(forced.stdout)["validation"]["forced"] is True


@pytest.fixture
def onnx_file(app, artifact):
    result = invoke(app, ["export", artifact, "--batch", "dynamic"])
    assert result.exit_code == 0, result.output
    return artifact / "model.onnx"


def test_profile_json_and_report_file(app, tmp_path, onnx_file):
    report_path = tmp_path / "report.json"
    result = invoke(app, ["profile", onnx_file, "--device", "cpu", "--batch", "1,2", "--iters", "5", "--warmup", "1",
                           "--threads", "1", "--json", "-o", report_path])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["label"] == "measured" and report["threads"] == 1
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert json.loads(report_path.read_text())["results"][0]["batch"] == 1
    table = invoke(app, ["profile", onnx_file, "--iters", "3", "--warmup", "0", "--batch", "1"])
    assert table.exit_code == 0 and "p50 ms" in table.stdout


def test_profile_predict(app, onnx_file):
    pytest.importorskip("mimc.latency.roofline")
    result = invoke(app, ["profile", onnx_file, "--device", "h100", "--predict", "--batch", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] == "predicted"



def test_profile_predict_table_shows_the_predictions_notes(app, onnx_file):
    """The roofline's notes (fp32 priced at the TF32 peak; nodes of unknown shape counted as free, which made a
    foreign QOperator graph read 0.000 GMACs) were in --json only: the table said nothing of them."""
    result = invoke(app, ["profile", onnx_file, "--device", "h100", "--predict", "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "TF32 tensor-core peak" in result.output


def test_profile_predict_names_the_batch_flag_on_a_static_graph(app, artifact):
    """--predict --batch 2 on a batch-1 graph said 'use batch 1', not the flag (measured profiles said --batch 1)."""
    assert invoke(app, ["export", artifact]).exit_code == 0
    one_error_line(invoke(app, ["profile", artifact / "model.onnx", "--device", "h100", "--predict", "--batch", "2"]), "use --batch 1")


def test_profile_predict_refuses_the_measurement_options(app, onnx_file):
    """--iters, --warmup and --threads time a measurement: with --predict they were silently ignored."""
    from mimc.errors import ConfigError
    from mimc.pipeline.stages import ProfileConfig

    for extra, flag in ((["--iters", "5"], "--iters"), (["--warmup", "0"], "--warmup"), (["--threads", "1"], "--threads")):
        one_error_line(invoke(app, ["profile", onnx_file, "--device", "h100", "--predict", *extra]), flag)
    with pytest.raises(ConfigError, match="iters"):  # a recipe's profile stage: refused when it is read
        ProfileConfig(device="h100", predict=True, iters=5)


def test_profile_report_never_replaces_a_file_the_graph_reads(app, tmp_path, onnx_file):
    """`profile g.onnx -o g.onnx.data` replaced the graph's external weights with the report, and
    `-o ART/mimc.json` the artifact's manifest (both read by the profile): refused like -o g.onnx."""
    import onnx

    loose = tmp_path / "loose"
    loose.mkdir()
    onnx.save(onnx.load(onnx_file), loose / "g.onnx", save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    for graph, out in ((loose / "g.onnx", loose / "g.onnx.data"), (onnx_file, onnx_file.parent / "mimc.json")):
        before = out.read_bytes()
        one_error_line(invoke(app, ["profile", graph, "--predict", "-o", out]), str(out.name))
        assert out.read_bytes() == before
    device = tmp_path / "mine.yaml"  # the device profile it reads: was replaced by the report too
    device.write_text((Path(mimc.__file__).parent / "profiles" / "cpu.yaml").read_text())
    one_error_line(invoke(app, ["profile", onnx_file, "--device", device, "--predict", "-o", device]), "mine.yaml")
    assert device.read_text().startswith("#")


def test_an_output_refused_as_an_input_is_named_even_on_a_long_path(app, tmp_path, onnx_file):
    """The refusal cut each path to its first 80 characters: under a deep folder it read "output
    /.../deep/g.onnx.... is the input /.../deep/g.onnx....", hiding which file was meant."""
    import shutil

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shutil.copy(onnx_file, deep / "g.onnx")
    one_error_line(invoke(app, ["profile", deep / "g.onnx", "--predict", "-o", deep / "g.onnx"]), "e/g.onnx is the input")


def test_profile_report_never_replaces_a_file_of_an_artifact(app, tmp_path, onnx_file):
    """`profile ART/model.onnx -o ART/model.safetensors` (or a graph's or IR's file the artifact lists) replaced it
    with the report: the artifact's weights were then refused as altered. Files the graph itself reads were guarded."""
    import shutil

    loose = tmp_path / "g.onnx"
    shutil.copy(onnx_file, loose)
    before = snapshot(onnx_file.parent)
    for graph in (onnx_file, loose):
        one_error_line(invoke(app, ["profile", graph, "--predict", "-o", onnx_file.parent / "model.safetensors"]), "model.safetensors")
    assert snapshot(onnx_file.parent) == before
    assert invoke(app, ["profile", onnx_file, "--predict", "-o", onnx_file.parent / "profile.json"]).exit_code == 0


def test_profile_refuses_more_threads_than_cores(app, onnx_file):
    """--threads 100000 started ONNX Runtime with that many threads: the process was killed (exit 137)."""
    import os

    one_error_line(invoke(app, ["profile", onnx_file, "--threads", str(os.cpu_count() + 1), "--iters", "1"]), "--threads")

def test_profile_bad_inputs(app, tmp_path, onnx_file, monkeypatch):
    from mimc.latency import run as run_mod

    monkeypatch.setattr(run_mod, "cuda_available", lambda: False)
    text = tmp_path / "x.txt"
    text.write_text("x")
    one_error_line(invoke(app, ["profile", text]), "not an ONNX graph", code=2)
    one_error_line(invoke(app, ["profile", tmp_path / "nope.onnx"]), "does not exist", code=2)
    one_error_line(invoke(app, ["profile", onnx_file, "--device", "abacus"]), "unknown device", code=2)
    one_error_line(invoke(app, ["profile", onnx_file, "--batch", "0"]), "positive integer", code=2)
    one_error_line(invoke(app, ["profile", onnx_file, "--device", "h100"]), "needs a CUDA GPU", code=2)
    one_error_line(invoke(app, ["profile", onnx_file, "-o", tmp_path / "no" / "r.json"]), "does not exist", code=2)
    assert not (tmp_path / "no").exists()


def test_profiling_a_tensorrt_qdq_graph_on_the_cpu_says_it_is_an_emulation(tmp_path):
    import json

    from typer.testing import CliRunner

    from mimc.artifact import save_artifact
    from mimc.cli.app import app
    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    art = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "a")
    runner = CliRunner()
    notes = {}
    for device in ("h100", "cpu"):
        out = art / f"{device}.onnx"
        result = runner.invoke(app, ["quantize", str(art), "--calib", "builtin", "--n", "8", "--device", device, "-o", str(out)])
        assert result.exit_code == 0, result.output
        prof = runner.invoke(app, ["profile", str(out), "--device", "cpu", "--iters", "2", "--warmup", "1", "--json"])
        assert prof.exit_code == 0, prof.output
        notes[device] = json.loads(prof.stdout).get("note")
    assert "emulation" in notes["h100"] and notes["cpu"] is None


def test_a_model_whose_outputs_overflow_fails_the_export_gate(app, tmp_path):
    # before: NaN outputs (finite weights that overflow) measured max abs 0.0 and SQNR 200 dB, so the
    # fp32 gate passed and the graph was written as validated
    import torch

    enc = build_encoder(tiny_config(), seed=0)
    with torch.no_grad():
        enc.blocks[0].mlp.fc1.weight.mul_(1e36)  # finite, but the activations overflow to inf, then NaN
    art = save_artifact(enc, tmp_path / "art")
    result = invoke(app, ["export", art])
    one_error_line(result, "outputs hold NaN/inf values", code=1)
    assert not (art / "model.onnx").exists()
    kept = invoke(app, ["export", art, "--force"])
    assert kept.exit_code == 0, kept.output
    assert "max abs inf (non-finite outputs)" in kept.stdout and "FAILED, kept by --force" in kept.stdout
