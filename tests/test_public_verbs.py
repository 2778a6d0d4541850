"""The package-level verbs README shows: ``mimc.run`` (a recipe) takes a mapping, a YAML path or an artifact."""
from __future__ import annotations

import yaml

import mimc


def test_run_from_a_mapping_a_file_and_an_artifact(tmp_path):
    recipe = {"model": "ref", "stages": [{"prune": {"ratio": 0.25}}, "export"]}
    first = mimc.run(recipe, tmp_path / "a")
    assert [s["stage"] for s in first["stages"]] == ["prune", "export"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mimc.run(path, tmp_path / "b")
    mimc.run(tmp_path / "a", tmp_path / "c")  # replay
    weights = {(tmp_path / d / "model.safetensors").read_bytes() for d in "abc"}
    assert len(weights) == 1 and mimc.load(tmp_path / "c").config.depth == 9  # 12 blocks, a quarter removed
