"""`mimc prune`, `mimc inspect`, `mimc eval`: the main job on `ref` end to end, and every bad input
(exit 2, one line, nothing written, input untouched)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimc.artifact import is_artifact, save_artifact
from mimc.models.io import load_artifact
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config
from tests.cli.conftest import invoke, one_error_line, snapshot


@pytest.fixture
def artifact(tmp_path):
    return save_artifact(build_encoder(tiny_config(depth=6), seed=0), tmp_path / "tiny")





# The main job on ref ------------------------------------------------------------------------------
def test_main_job_on_ref_prune_export_eval(app, tmp_path):
    half = tmp_path / "out" / "half"
    result = invoke(app, ["prune", "ref", "--ratio", "0.5", "-o", half, "--json"])
    assert result.exit_code == 0, result.output
    pruned = json.loads(result.stdout)
    assert len(pruned["metrics"]["removed_blocks"]) == 6 and len(pruned["metrics"]["kept_blocks"]) == 6
    assert pruned["config"]["criterion"] == "entropy" and len(pruned["metrics"]["scores"]["entropy"]) == 12
    assert is_artifact(half) and load_artifact(half).config.depth == 6

    result = invoke(app, ["export", half, "--json"])
    assert result.exit_code == 0, result.output
    assert (half / "model.onnx").is_file()

    result = invoke(app, ["eval", half / "model.onnx", "--ref", "ref", "--data", "builtin", "--n", "60", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["n_images"] == 60 and report["data"]["labelled"]
    assert 0.0 < report["fidelity"]["pooled_cosine_mean"] < 1.0
    assert report["fidelity"]["token_cosine_mean"] is not None
    assert 0.0 <= report["knn_top1"] <= 1.0 and 0.0 < report["reference_knn_top1"] <= 1.0


# prune --------------------------------------------------------------------------------------------
def test_prune_table_default_output_and_data_fidelity(app, artifact, calib, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(app, ["prune", artifact, "--blocks", "1,4", "--criterion", "l1", "--data", calib])
    assert result.exit_code == 0, result.output
    assert "removed" in result.stdout and "l1" in result.stdout
    out = tmp_path / "tiny-pruned"
    loaded = load_artifact(out)
    assert loaded.config.block_ids == [0, 2, 3, 5]
    metrics = loaded.manifest.stages[-1].metrics
    assert metrics["removed_blocks"] == [1, 4] and metrics["fidelity_data"]["n_images"] == 24


def test_prune_sensitivity_uses_the_data(app, artifact, calib, tmp_path):
    result = invoke(app, ["prune", artifact, "--keep", "4", "-c", "sensitivity", "--data", calib, "-o", tmp_path / "s", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    s = report["metrics"]["scores"]["sensitivity"]
    assert sorted(report["metrics"]["removed_blocks"]) == sorted(sorted(range(6), key=lambda i: s[i])[:2])


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


@pytest.mark.parametrize(
    "args, match",
    [
        (["prune", "MISSING", "--ratio", "0.5"], "not found"),
        (["prune", "NOTMODEL", "--ratio", "0.5"], "neither a mimc artifact"),
        (["prune", "CORRUPT", "--ratio", "0.5"], "not a valid .safetensors"),
        (["prune", "EVIL", "--ratio", "0.5"], "would run code"),
        (["prune", "ART", "--ratio", "0"], "--ratio must be in (0, 1), got 0.0"),
        (["prune", "ART", "--ratio", "1"], "--ratio must be in (0, 1)"),
        (["prune", "ART", "--ratio", "-0.3"], "--ratio must be in (0, 1)"),
        (["prune", "ART", "--keep", "7"], "more than the model's depth 6: give --keep between 1 and 5"),
        (["prune", "ART", "--blocks", "2,9"], "do not exist"),
        (["prune", "ART", "--ratio", "0.5", "--keep", "3"], "exactly one"),
        (["prune", "ART", "--ratio", "0.5", "--criterion", "magic"], "unknown --criterion 'magic'"),
        (["prune", "ART", "--ratio", "0.5", "--criterion", "sensitivity"], "--data"),
        (["prune", "ART", "--ratio", "0.5", "--data", "MISSING.npz"], "does not exist"),
        # --n without --data was silently unused (exit 0)
        (["prune", "ART", "--ratio", "0.5", "--n", "5"], "--n counts the images read from --data and no --data is given"),
        (["width", "ART", "--mlp", "0.5", "--n", "5"], "--n counts the images read from --data and no --data is given"),
    ],
)
def test_prune_bad_inputs_exit_2_and_write_nothing(app, artifact, tmp_path, args, match):
    import torch

    not_a_model = tmp_path / "notmodel"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    (not_a_model / "corrupt.safetensors").write_bytes(b"definitely not safetensors")
    torch.save({"weights": _RunsCodeWhenUnpickled()}, not_a_model / "evil.pth")  # saving runs nothing
    subs = {
        "MISSING": str(tmp_path / "missing"), "NOTMODEL": str(not_a_model), "ART": str(artifact), "MISSING.npz": str(tmp_path / "x.npz"),
        "CORRUPT": str(not_a_model / "corrupt.safetensors"), "EVIL": str(not_a_model / "evil.pth"),
    }
    before = {p: snapshot(p) for p in (artifact, not_a_model)}
    out = tmp_path / "out"
    result = invoke(app, [subs.get(a, a) for a in args] + ["-o", out])
    one_error_line(result, match)
    assert not out.exists()
    assert {p: snapshot(p) for p in (artifact, not_a_model)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notmodel", "tiny"]  # no temp dirs left


def test_prune_refuses_occupied_output(app, artifact, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(app, ["prune", artifact, "--ratio", "0.5", "-o", out])
    one_error_line(result, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_prune_and_export_under_torchrun_are_refused_in_one_line(app, artifact, tmp_path, monkeypatch):
    # prune ran on every rank, each printing "wrote OUT"; export ran whole on every rank, each writing into the artifact
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = snapshot(artifact)
    one_error_line(invoke(app, ["prune", artifact, "--ratio", "0.5", "-o", tmp_path / "p"]),
                   "mimc prune runs in one process and torchrun started 2: run mimc prune without torchrun")
    one_error_line(invoke(app, ["export", artifact]), "run mimc export without torchrun")
    assert not (tmp_path / "p").exists() and snapshot(artifact) == before


# inspect ------------------------------------------------------------------------------------------
def test_inspect_all_criteria_oracle_spearman_and_plot(app, artifact, calib, tmp_path):
    plot = tmp_path / "scores.png"
    result = invoke(app, ["inspect", artifact, "--data", calib, "-o", plot, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = {"entropy", "entropy_hist", "l1", "l2", "variance", "kurtosis", "random", "last", "sensitivity"}
    assert set(report["scores"]) == expected and all(len(v) == 6 for v in report["scores"].values())
    rho = report["spearman_vs_sensitivity"]
    assert set(rho) == expected - {"sensitivity"} and all(r is None or -1.0 <= r <= 1.0 for r in rho.values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = invoke(app, ["inspect", artifact, "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "entropy_hist" in result.stdout and "kurtosis" in result.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["inspect", "MISSING"], "not found"),
        (["inspect", "ART", "-o", "plot.txt"], ".png"),
        (["inspect", "ART", "--dtype", "int4"], "unknown entropy --dtype"),
        (["inspect", "ART", "--data", "MISSING.npz"], "does not exist"),
        # these were silently unused (exit 0): --n and --batch-size count and batch images of --data, and
        # --no-plot writes no plot for -o to name
        (["inspect", "ART", "--n", "5"], "--n"),
        (["inspect", "ART", "--batch-size", "4"], "--batch-size"),
        (["inspect", "ART", "--no-plot", "-o", "p.png"], "--no-plot"),
    ],
)
def test_inspect_bad_inputs(app, artifact, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    subs = {"MISSING": str(tmp_path / "missing"), "ART": str(artifact), "MISSING.npz": str(tmp_path / "x.npz")}
    result = invoke(app, [subs.get(a, a) for a in args])
    one_error_line(result, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


# eval ---------------------------------------------------------------------------------------------
def test_eval_artifact_against_itself_and_unlabelled_data(app, artifact, calib, tmp_path, tiny_images):
    result = invoke(app, ["eval", artifact, "--ref", artifact, "--data", calib, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fidelity"]["pooled_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert report["knn_top1"] == report["reference_knn_top1"]
    result = invoke(app, ["eval", artifact, "--ref", artifact, "--data", calib, "--device", "cpu", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == report  # the torch runner on 1 thread: the same numbers
    np.save(tmp_path / "plain.npy", tiny_images[0])
    result = invoke(app, ["eval", artifact, "--data", tmp_path / "plain.npy"])
    assert result.exit_code == 0, result.output
    assert "k-NN skipped" in result.stderr  # notes go to stderr


def test_eval_n_past_the_images_says_so(app, artifact, calib):
    # --n 100000 on a handful of images evaluated them all without a word (embed says so)
    result = invoke(app, ["eval", artifact, "--data", calib, "--n", "100000"])
    assert result.exit_code == 0, result.output
    assert "fewer than --n 100000: evaluated all of them" in " ".join(result.stderr.split())
    assert "fewer than --n" not in invoke(app, ["eval", artifact, "--data", calib, "--n", "2"]).stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["eval", "MISSING"], "not found"),
        (["eval", "FOREIGN"], "not written by mimc"),
        (["eval", "ART", "--data", "MISSING.npz"], "does not exist"),
        (["eval", "ART", "--ref", "MISSING"], "not found"),
        (["eval", "ART", "--n", "0"], "--n"),
        (["eval", "ART", "--device", "tpu"], "--device tpu is not cpu or cuda"),
        (["eval", "ART", "--threads", "0"], "--threads must be 1 or more"),
        (["eval", "ART", "--threads", "100000"], "--threads 100000 is more than the"),
        pytest.param(["eval", "ART", "--ref", "ART", "--device", "cuda"], "--device cuda: no CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")),
    ],
)
def test_eval_bad_inputs(app, artifact, tmp_path, args, match):
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not really onnx")
    subs = {"MISSING": str(tmp_path / "missing"), "ART": str(artifact), "FOREIGN": str(foreign), "MISSING.npz": str(tmp_path / "x.npz")}
    result = invoke(app, [subs.get(a, a) for a in args])
    one_error_line(result, match)


# eval --val ---------------------------------------------------------------------------------------
def _image_folder(root, images, labels, names):
    """``root/<class name>/<i>.png``: the class subfolders give the labels."""
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels)):
        (root / names[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[lab] / f"{i:03d}.png")
    return root


def test_eval_val_classifies_val_folder_against_data_folder(app, artifact, tmp_path, tiny_images):
    images, labels = tiny_images
    three = np.arange(len(images)) % 3
    train = _image_folder(tmp_path / "train", images[:18], three[:18], ["cat", "dog", "fox"])
    val = _image_folder(tmp_path / "val", images[18:][three[18:] != 1], [0, 1, 0, 1], ["cat", "fox"])  # no dog
    result = invoke(app, ["eval", artifact, "--ref", artifact, "--data", train, "--val", val, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["knn_protocol"] == "gallery-query" and (report["knn_gallery_size"], report["knn_query_size"]) == (18, 4)
    assert report["fidelity_on"] == "val" and report["fidelity"]["n_images"] == 4 and report["val"]["labelled"]
    assert 0.0 <= report["knn_top1"] == report["reference_knn_top1"] <= 1.0
    result = invoke(app, ["eval", artifact, "--ref", artifact, "--data", train, "--val", val])
    assert result.exit_code == 0, result.output
    assert "4 val vs 18 gallery" in result.stdout and "on val" in result.stdout


@pytest.mark.parametrize(
    "data, val, match",
    [
        ("labelled.npz", "plain.npy", "--val has no labels"),
        ("plain.npy", "labelled.npz", "--data has no labels"),
        ("labelled.npz", "labelled.npz", "--val holds the same images as --data"),
        ("named.npz", "owl.npz", "--val has 1 class(es) that --data lacks (owl)"),
        ("named.npz", "labelled.npz", "--data names its classes but --val has only numeric labels"),
        ("labelled.npz", "missing.npz", "--val path"),
        ("labelled.npz", "empty", "point --val at a folder of images"),
        ("named.npz", "val", "--val: cannot read image"),  # an unreadable val image
    ],
)
def test_eval_val_bad_inputs(app, artifact, tmp_path, tiny_images, calib, data, val, match):
    images, labels = tiny_images
    np.save(tmp_path / "plain.npy", images)
    np.savez(tmp_path / "named.npz", images=images[:12], labels=labels[:12], class_names=["cat", "dog"])
    np.savez(tmp_path / "owl.npz", images=images[12:], labels=labels[12:], class_names=["cat", "owl"])
    (tmp_path / "empty").mkdir()
    _image_folder(tmp_path / "val", images[:3], [0, 1, 0], ["cat", "dog"])
    (tmp_path / "val" / "cat" / "zz.png").write_bytes(b"not a png")
    files = {"labelled.npz": calib, "missing.npz": tmp_path / "missing.npz"}
    result = invoke(app, ["eval", artifact, "--data", files.get(data, tmp_path / data), "--val", files.get(val, tmp_path / val)])
    one_error_line(result, match)
    if val == "val":  # its path as it is ('val' not turned into the flag), the flag to skip it named
        assert "/val/cat/zz.png" in result.stderr and "--val/" not in result.stderr
        assert result.stderr.strip().endswith("skip unreadable images with --skip-corrupt")


@pytest.mark.slow
def test_eval_under_torchrun_gives_one_process_report(artifact, tmp_path, tiny_images):
    """2 CPU ranks each run their shard of data and val; rank 0 alone reports what one process reports."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    images, _ = tiny_images
    three = np.arange(len(images)) % 3
    _image_folder(tmp_path / "train", images[:17], three[:17], ["cat", "dog", "fox"])
    _image_folder(tmp_path / "val", images[17:], three[17:], ["cat", "dog", "fox"])
    save_artifact(build_encoder(tiny_config(depth=6), seed=1), tmp_path / "other")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimc"]
    common = ["eval", "tiny", "--ref", "other", "--data", "train", "--val", "val", "--batch-size", "4", "--json"]

    def run(launcher, *extra):
        return subprocess.run([*launcher, *common, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    one, two = run([sys.executable, "-m", "mimc"]), run(torchrun, "--n-images", "12")
    assert one.returncode == 0 and two.returncode == 0, [ln for ln in (one.stderr + two.stderr).splitlines() if "error" in ln]
    assert two.stdout.count('"fidelity"') == 1  # rank 0 alone reports
    a, b = json.loads(one.stdout), json.loads(two.stdout[two.stdout.index("{"):])
    assert (b["rank"], b["ranks"]) == (0, 2) and "rank" not in a
    assert b["knn_gallery_size"] == b["data"]["n_images"] == 12 and b["knn_query_size"] == 7  # --n-images: of each set
    assert (a["knn_gallery_size"], a["knn_query_size"]) == (17, 7)
    full = run(torchrun)
    b = json.loads(full.stdout[full.stdout.index("{"):])
    for key in ("knn_top1", "reference_knn_top1", "knn_protocol", "knn_val_in_data", "fidelity_on"):
        assert a[key] == b[key], key
    for key, value in a["fidelity"].items():
        assert b["fidelity"][key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
    assert b["data"]["n_images"] == 17 and b["val"]["n_images"] == 7

    # an unreadable image in rank 1's shard of val stops both ranks, each naming it and the flag
    (tmp_path / "val" / "fox" / "zz.png").write_bytes(b"not a png")
    bad = run(torchrun)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 2 and all("zz.png" in ln and "--skip-corrupt" in ln for ln in errors)
    assert any(ln.startswith("error: rank 1: ") for ln in errors)
