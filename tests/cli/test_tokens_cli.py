import json

import pytest
from typer.testing import CliRunner

from mimc.artifact import save_artifact
from mimc.models.io import load_artifact


@pytest.fixture
def model_dir(tmp_path, tiny_encoder):
    return str(save_artifact(tiny_encoder, tmp_path / "tiny"))


def test_tokens_writes_an_artifact_with_the_schedule(app, tmp_path, model_dir):
    out = tmp_path / "topk"
    result = CliRunner().invoke(app, ["tokens", model_dir, "--method", "topk", "--keep", "0.5", "--at", "2,3", "--no-fuse", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    loaded = load_artifact(out)
    assert loaded.config.token_schedule == {"method": "topk", "keep": 0.5, "blocks": [1, 2], "fuse": False, "score": "mean"}
    assert report["metrics"]["tokens_per_block"] == [17, 17, 9, 5, 5]
    assert loaded.manifest.stages[-1].metrics["macs_ratio"] == report["metrics"]["macs_ratio"] < 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "tome", "--r", "8,8,8,8,8"], "r lists 5 blocks"),  # a large r is clipped, a long list refused
        (["--method", "topk", "--keep", "0"], "keep"),
        (["--method", "drop", "--keep", "1.5"], "keep"),
        (["--method", "topk", "--at", "4,7,10"], "beyond"),
        (["--method", "blur"], "unknown --method 'blur'"),
        (["--method", "tome"], "--r"),
        (["--method", "tome", "--r", "2,x"], "--r"),
        (["--method", "drop", "--no-fuse"], "--fuse only applies to --method topk"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(app, tmp_path, model_dir, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["tokens", model_dir, *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp leftovers either
