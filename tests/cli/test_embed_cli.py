"""``mimc embed``: --json report, flags in error lines, nothing written on refusal, WebDataset shards,
and torchrun (2 CPU ranks) writing one output equal to a single process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimc.artifact import save_artifact
from mimc.models.vit import build_encoder
from tests.cli.conftest import invoke, one_error_line, snapshot
from tests.conftest import tiny_config


@pytest.fixture
def work(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(10):
        path = tmp_path / "data" / f"c{i % 2}" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")
    return tmp_path


def test_json_report_and_files(app, work):
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats", "--batch-size", "3",
                          "--workers", "0", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("model", "runtime", "output", "images", "skipped", "seconds", "images_per_second", "feature_shape"):
        assert key in report
    assert report["runtime"] == "torch" and report["images"] == 10 and report["skipped"] == 0
    assert report["feature_shape"] == [64] and report["output"] == str(work / "feats.npy") and report["threads"] == 1
    assert np.load(work / "feats.npy").shape == (10, 64)
    index = json.loads((work / "feats.json").read_text())
    assert [r["name"] for r in index["rows"]][:2] == ["c0/00.jpg", "c0/02.jpg"] and index["class_names"] == ["c0", "c1"]

    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats.parquet"])
    assert result.exit_code == 0, result.output
    assert "embedded" in result.stdout and "10" in result.stdout


def test_n_past_the_images_of_the_source_says_so(app, work):
    # --n 10000 on a source of 10 images embedded the 10 without a word
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats", "--n", "10000", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 10000 and report["images"] == 10
    assert f"note: {work / 'data'} holds 10 images, fewer than --n 10000: embedded all of them" in " ".join(result.stderr.split())
    quiet = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "some", "--n", "4", "--workers", "0"])
    assert quiet.exit_code == 0 and "note" not in quiet.stderr


def test_workers_0_is_honoured_where_the_default_would_start_one(app, work):
    # 0 == False: --workers 0 read as "left at its default", so 256 images and more were decoded by a worker anyway
    result = invoke(app, ["embed", work / "art", "--data", "builtin", "--n", "256", "-o", work / "f", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workers"] == 0


def test_a_corrupt_image_is_one_line_and_nothing_is_written(app, work):
    (work / "data" / "c1" / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    before = snapshot(work)
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats.npy", "--workers", "1"])
    one_error_line(result, "zz-broken.jpg")
    assert "--skip-corrupt" in result.stderr
    assert snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["art", "data"]

    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats.npy", "--skip-corrupt", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 10 and report["skipped"] == 1 and report["skipped_names"] == ["c1/zz-broken.jpg"]
    index = json.loads((work / "feats.json").read_text())
    assert len(index["rows"]) == 10 == np.load(work / "feats.npy").shape[0] and index["skipped"] == 1


@pytest.mark.parametrize("args, match", [
    (["-o", "{work}/feats.npy", "--batch-size", "0"], "--batch-size must be in [1, 4096], got 0"),
    (["-o", "{work}/feats.npy", "--threads", "0"], "--threads must be 1 or more"),
    (["-o", "{work}/feats.npy", "--threads", "100000"], "--threads 100000 is more than the"),  # was 100000 threads started
    (["-o", "{work}/feats.npy", "--workers", "-1"], "--workers must be 0"),
    (["-o", "{work}/feats.npy", "--workers", "100000"], "--workers 100000 is more than"),  # was 100000 forks
    (["-o", "{work}/feats.npy", "--device", "tpu"], "--device tpu is not cpu or cuda"),
    (["-o", "{work}/feats.txt"], "must end in .npy"),
    (["-o", "{work}/data/feats.npy"], "lies inside the input"),
])
def test_bad_options_name_their_flag_and_write_nothing(app, work, args, match):
    before = snapshot(work)
    args = [a.format(work=work) for a in args]
    result = invoke(app, ["embed", work / "art", "--data", work / "data", *args, "--json"])
    one_error_line(result, match)
    assert json.loads(result.stdout)["exit_code"] == 2 and snapshot(work) == before


def test_an_existing_output_is_refused_unless_overwrite(app, work):
    (work / "feats.npy").write_bytes(b"old")
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats.npy"])
    one_error_line(result, "already exists")
    assert "--overwrite" in result.stderr and (work / "feats.npy").read_bytes() == b"old"
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", work / "feats.npy", "--overwrite", "--n", "4"])
    assert result.exit_code == 0, result.output
    assert np.load(work / "feats.npy").shape == (4, 64)


def test_webdataset_shards(app, work, tiny_images):
    wds = pytest.importorskip("webdataset")
    import io

    images, labels = tiny_images
    for s in range(2):
        with wds.TarWriter(str(work / f"train-{s:03d}.tar")) as sink:
            for i in range(s * 5, s * 5 + 5):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"k{i:03d}", "png": buf.getvalue(), "cls": int(labels[i])})
    result = invoke(app, ["embed", work / "art", "--data", f"{work}/train-{{000..001}}.tar", "-o", work / "w.npy", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads((work / "w.json").read_text())
    assert [r["label"] for r in index["rows"]] == labels[:10].tolist()
    assert index["rows"][5]["name"].startswith("train-001.tar:")


@pytest.mark.slow
def test_torchrun_ranks_write_one_output_equal_to_one_process(work):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    common = ["embed", "art", "--data", "data", "--batch-size", "2", "--workers", "0", "--json"]
    one = subprocess.run([sys.executable, "-m", "mimc", *common, "-o", "one.npy"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimc",
                          *common, "-o", "two.npy"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads(two.stdout[two.stdout.index("{"):])  # rank 0 alone reports
    assert two.stdout.count('"output"') == 1 and report["world"] == 2 and report["images"] == 10
    np.testing.assert_allclose(np.load(work / "two.npy"), np.load(work / "one.npy"), atol=1e-6, rtol=0)
    a, b = json.loads((work / "one.json").read_text()), json.loads((work / "two.json").read_text())
    assert a["rows"] == b["rows"] and b["images"] == 10
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # no temporaries or locks left

    # a rank that fails (an unreadable image in rank 1's shard) stops every rank: no hang, nothing written
    (work / "data" / "c1" / "zz.jpg").write_bytes(b"not a jpeg")
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimc",
                          *common, "-o", "three.npy"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and all("zz.jpg" in ln and "--skip-corrupt" in ln for ln in errors)
    assert any(ln.startswith("error: rank 1: ") for ln in errors)
    assert not (work / "three.npy").exists() and not [p.name for p in work.iterdir() if p.name.startswith(".")]


def test_an_output_ending_in_a_slash_names_a_folder_and_is_refused(app, work):
    # before: -o new/ (a folder not made yet) lost its slash on the way in and wrote new.npy + new.json
    result = invoke(app, ["embed", work / "art", "--data", work / "data", "-o", f"{work / 'new'}/", "--n", "2"])
    one_error_line(result, "is a folder: name the features file in it, like")
    assert not (work / "new.npy").exists() and not (work / "new").exists()
