"""`mimc width`: a narrower artifact with per-block widths recorded; bad input exits 2 and writes nothing."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from mimc.artifact import MANIFEST_NAME, save_artifact
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config


def invoke(args):
    from mimc.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_width_writes_a_narrow_artifact_and_records_the_stage(tmp_path, tiny_images):
    src = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "src")
    images, labels = tiny_images
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "narrow"
    result = invoke(["width", src, "--mlp", "0.5", "--heads", "0.5", "--criterion", "activation", "--data", tmp_path / "d.npz",
                     "--round-to", "8", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    m = report["metrics"]
    assert m["mlp_dims"] == [64] * 4 and m["heads"] == [2] * 4 and m["fidelity_data"]["n_images"] == 24
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stages"][-1]["name"] == "width" and manifest["encoder"]["block_heads"] == [2] * 4


def test_width_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    src = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "src")
    for args, match in ((["--mlp", "1.5"], "--mlp must be in [0, 1), got 1.5"), ([], "give --mlp and/or --heads above 0"),
                        (["--mlp", "0.5", "--criterion", "activation"], "give --data")):
        result = invoke(["width", src, *args, "-o", tmp_path / "out"])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
