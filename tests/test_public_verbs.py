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


def test_embed_is_a_verb_with_a_typed_report(tmp_path):
    from mimc.api import EmbedReport

    report = mimc.embed("ref", "builtin", tmp_path / "feats", n=8, workers=0)
    assert isinstance(report, EmbedReport) and report.written and report["images"] == 8
    body = report.to_dict()
    assert body["output"] == str(tmp_path / "feats.npy") and body["feature_shape"] == [128] and body["runtime"] == "torch"
    assert json_load(tmp_path / "feats.json")["class_names"] and len(json_load(tmp_path / "feats.json")["rows"]) == 8


def json_load(path):
    import json

    return json.loads(path.read_text())
