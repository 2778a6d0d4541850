"""The image-reading options every command that reads images shares (--workers, --skip-corrupt, columns)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.cli.conftest import invoke, one_error_line


def _folder(tmp_path, corrupt: bool):
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "imgs" / f"c{i % 2}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    if corrupt:
        (tmp_path / "imgs" / "c1" / "zz-broken.png").write_bytes(b"\x89PNG truncated")
    return tmp_path / "imgs"


def test_a_corrupt_image_stops_the_command_by_name_unless_skipped(app, tmp_path):
    data = _folder(tmp_path, corrupt=True)
    out = tmp_path / "out"
    args = ["prune", "ref", "--ratio", "0.5", "--data", data, "-o", out]
    result = invoke(app, args)
    one_error_line(result, "zz-broken.png")
    assert "--skip-corrupt" in result.stderr and not out.exists()
    result = invoke(app, [*args, "--skip-corrupt", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["metrics"]["fidelity_data"]["n_images"] == 12 and body["skipped_images"] == ["c1/zz-broken.png"]
    assert "skipped 1 unreadable image" in result.stderr


def test_quantize_takes_them_for_its_calibration_images(app, tmp_path):
    data = _folder(tmp_path, corrupt=True)
    result = invoke(app, ["quantize", "ref", "--int8", "--calib", data, "-o", tmp_path / "q.onnx"])
    one_error_line(result, "zz-broken.png")
    assert not (tmp_path / "q.onnx").exists()


def test_reading_options_are_checked(app):
    one_error_line(invoke(app, ["inspect", "ref", "--data", "builtin", "--workers", "-2"]), "--workers must be 0")


def test_training_options_on_a_one_shot_method_are_refused(app, tmp_path):
    result = invoke(app, ["sparsify", "ref", "--pattern", "2:4", "--method", "wanda", "--calib", "builtin", "--steps", "10",
                          "-o", tmp_path / "o"])
    one_error_line(result, "--steps only apply to method learned")
    assert not (tmp_path / "o").exists()


def test_a_column_of_a_source_that_has_no_columns_is_refused(app, tmp_path):
    """--image-column / --label-column name a saved datasets folder's columns: on a folder they were ignored silently."""
    data = _folder(tmp_path, corrupt=False)
    for flag in ("--image-column", "--label-column"):
        result = invoke(app, ["embed", "ref", "--data", data, "-o", tmp_path / "f", flag, "img", "--workers", "0"])
        one_error_line(result, f"{flag} names a column of a saved datasets folder")
        assert not (tmp_path / "f.npy").exists()
    result = invoke(app, ["eval", "ref", "--data", "builtin", "--n", "4", "--label-column", "y"])
    one_error_line(result, "--label-column names a column")


def test_reading_options_without_the_images_they_read_are_refused(app, tmp_path, monkeypatch):
    """`mimc prune ref --ratio 0.5 --skip-corrupt` (no --data: a data-free criterion) and `mimc inspect ref --workers 2`
    dropped the reading option without a word (exit 0, the artifact or plot written)."""
    monkeypatch.chdir(tmp_path)
    for args, flag in ((["prune", "ref", "--ratio", "0.5", "-o", "out", "--skip-corrupt"], "--skip-corrupt"),
                       (["width", "ref", "--mlp", "0.5", "-o", "out", "--workers", "1"], "--workers"),
                       (["inspect", "ref", "--image-column", "img"], "--image-column")):
        one_error_line(invoke(app, args), flag)
        assert "--data" in invoke(app, args).stderr and list(tmp_path.iterdir()) == []
