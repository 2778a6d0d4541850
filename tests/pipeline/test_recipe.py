"""Recipes: validation before any work, a full run into one artifact, exact replay, manifests as recipes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml
from typer.testing import CliRunner

from mimc.artifact import MANIFEST_NAME, read_manifest, save_artifact
from mimc.errors import BadInputError, ConfigError
from mimc.models.vit import build_encoder
from mimc.pipeline.recipe import load_recipe, parse_recipe, recipe_from_artifact
from mimc.pipeline.recipe_run import run_recipe
from tests.conftest import tiny_config


@pytest.fixture
def source(tmp_path, tiny_images):
    """A tiny artifact as the recipe's model and a labelled .npz as its data."""
    images, labels = tiny_images
    data = tmp_path / "data.npz"
    np.savez(data, images=images, labels=labels)
    model = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "src")
    return str(model), str(data)


def recipe_dict(model, data, **extra):
    return {"model": model, "data": data, "n": 16, "stages": [
        {"prune": {"ratio": 0.5}},
        {"sparsify": {"pattern": "2:4", "method": "wanda", "n_calib": 8}},
        "export",
        {"quantize": {"n": 16}},
        {"profile": {"device": "cpu", "warmup": 1, "iters": 3}},
        {"eval": {}},
    ], **extra}


def test_a_recipe_runs_every_stage_into_one_artifact_and_replays_exactly(tmp_path, source):
    model, data = source
    out = tmp_path / "out"
    report = run_recipe(parse_recipe(recipe_dict(model, data)), out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", MANIFEST_NAME, "model.onnx", "model.int8.onnx", "recipe.yaml", "run.json"} <= files
    assert [s["stage"] for s in report["stages"]] == ["prune", "sparsify", "export", "quantize", "profile", "eval"]
    assert json.loads((out / "run.json").read_text())["stages"][0]["metrics"]["removed_blocks"] == report["stages"][0]["metrics"]["removed_blocks"]
    run_json = (out / "run.json").read_text()
    assert ".tmp" not in run_json and "mimc-baseline" not in run_json  # no path that is gone once the run ended
    manifest = read_manifest(out)
    assert [s.name for s in manifest.stages] == ["prune", "sparsify"]
    assert manifest.files["model.int8.onnx"]["validation"]["passed"]
    by = {s["stage"]: s for s in report["stages"]}
    assert by["quantize"]["validation"]["fidelity"]["pooled_cosine_mean"] >= 0.99
    assert by["profile"]["result"]["label"] == "measured" and by["profile"]["file"] == "model.int8.onnx"
    assert by["profile"]["baseline"]["label"] == "measured" and by["profile"]["speedup_vs_dense"] > 0
    inter = by["profile"]["interleaved_ms"]  # the ratio comes from both graphs timed together
    assert by["profile"]["speedup_vs_dense"] == round(inter["dense"] / inter["graph"], 3)
    assert 0 < by["eval"]["fidelity"]["pooled_cosine_mean"] <= 1 and "knn_top1" in by["eval"]
    # Replaying the output (its recipe.yaml) rebuilds the same bytes.
    again = tmp_path / "again"
    run_recipe(load_recipe(out), again)
    for name in ("model.safetensors", "model.onnx", "model.int8.onnx"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_a_manifest_written_stage_by_stage_becomes_a_recipe(tmp_path):
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.quant.quantize import QuantizeConfig
    import mimc
    from mimc.compression.registry import compress
    from mimc.deploy.onnx import export_onnx
    from mimc.models.resolve import load_model

    model, data = "ref", "builtin"  # a source the manifest can name (an in-memory encoder has none)
    pruned, _ = compress(load_model(model), BlockPruningConfig(keep=3, criterion="l2"))
    art = save_artifact(pruned, tmp_path / "art")
    export_onnx(pruned, art / "model.onnx", batch="dynamic")
    mimc.quantize(str(art), data, config=QuantizeConfig(n=16, smooth=0.5))
    recipe = recipe_from_artifact(art)
    assert recipe.model == model and recipe.data == data
    assert [(s.name, s.config.to_dict()) for s in recipe.steps[:1]] == [("prune", BlockPruningConfig(keep=3, criterion="l2").to_dict())]
    assert recipe.steps[1].name == "export" and recipe.steps[1].config.batch == "dynamic"
    assert recipe.steps[2].name == "quantize" and recipe.steps[2].config == QuantizeConfig(n=16, smooth=0.5)
    out = run_recipe(recipe, tmp_path / "replayed")
    assert (tmp_path / "replayed" / "model.safetensors").read_bytes() == (art / "model.safetensors").read_bytes()
    assert out["stages"][-1]["validation"]["passed"]


@pytest.mark.parametrize("change, match", [
    ({"stages": [{"prnue": {"ratio": 0.5}}]}, "unknown stage 'prnue'"),
    ({"stages": [{"prune": {"ratoi": 0.5}}]}, "unknown option(s) ['ratoi']"),
    ({"stages": [{"prune": {"ratio": 1.5}}]}, "recipe: stages[0].prune.ratio must be in (0, 1), got 1.5"),
    ({"stages": ["export", {"prune": {"ratio": 0.5}}]}, "come after graph stage 'export'"),
    ({"stages": ["export", "export"]}, "appears 2 times"),
    ({"stages": [{"quantize": {}}, "export"]}, "export first"),
    ({"stages": [{"profile": {"device": "tpu-v9"}}]}, "tpu-v9"),
    # were refused only when the profile stage ran, after every stage before it
    ({"stages": [{"export": {"batch": "dynamic"}}, {"profile": {"batch_sizes": [100000]}}]}, "batch_sizes must hold values in [1, 4096]"),
    ({"stages": ["export", {"profile": {"threads": 100000}}]}, "threads 100000 is more than the"),
    ({"stages": []}, "non-empty list"),
    ({"modle": "ref"}, "unknown key(s) ['modle']"),
    ({"n": 0}, "'n' must be a positive integer"),
    # before: refused once the run started as the model being "its own stages[0].distill.teacher", a key no recipe has
    ({"stages": [{"distill": {"steps": 1}}]}, "stages[0].distill would distill the recipe's model from itself"),
    # ToMe without r merges nothing: passed --dry-run and was refused only after the stages before it ran
    ({"stages": [{"prune": {"ratio": 0.5}}, {"tokens": {}}]}, "stages[1].tokens.r"),
    ({"stages": [{"tokens": {"method": "tome", "r_list": [0, 0]}}]}, "stages[0].tokens.r"),
    # was "recipe: 'profile' measures a graph", naming neither the stage nor where it sits, found only by the run
    ({"stages": [{"prune": {"ratio": 0.5}}, {"profile": {}}]}, "stages[1].profile measures a graph"),
])
def test_bad_recipes_are_refused_before_any_work(change, match):
    data = {"model": "ref", "data": "builtin", "stages": [{"prune": {"ratio": 0.5}}], **change}
    with pytest.raises(ConfigError) as info:
        parse_recipe(data)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_stages_that_need_images_need_data():
    with pytest.raises(ConfigError, match=r"need images: add 'data: DIR'"):
        parse_recipe({"model": "ref", "stages": ["export", {"quantize": {}}]})
    with pytest.raises(ConfigError, match="add an 'export'"):
        run_recipe(parse_recipe({"model": "ref", "stages": [{"profile": {}}]}), "unused")


def test_cli_runs_dry_runs_and_refuses_bad_input_with_one_line(tmp_path, source):
    from mimc.cli.app import app

    model, data = source
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model, "stages": [{"prune": {"ratio": 0.5}}, "export"]}))
    runner = CliRunner()
    dry = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert parse_recipe(yaml.safe_load(dry.stdout)).to_dict() == load_recipe(path).to_dict()
    dry_json = runner.invoke(app, ["run", str(path), "--dry-run", "--json"])  # --json: the same recipe as JSON
    assert dry_json.exit_code == 0 and json.loads(dry_json.stdout) == json.loads(json.dumps(load_recipe(path).to_dict()))
    out = tmp_path / "cli-out"
    ok = runner.invoke(app, ["run", str(path), "-o", str(out), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["stages"][1]["file"] == "model.onnx" and (out / "model.onnx").is_file()
    replay = runner.invoke(app, ["run", str(out), "-o", str(tmp_path / "replayed")])
    assert f"replay of {out}: identical (model.safetensors, model.onnx)" in replay.stdout, replay.output
    again = runner.invoke(app, ["run", str(path), "-o", str(out)])  # occupied output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: ref\nstages: [{prune: {ratio: 0.5}}\n")  # unclosed bracket
    for result, match in ((again, "already exists"), (runner.invoke(app, ["run", str(bad), "-o", str(tmp_path / "x")]), "not valid YAML"),
                          (runner.invoke(app, ["run", str(tmp_path / "missing.yaml")]), "does not exist")):
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0], result.stderr
    assert not (tmp_path / "x").exists()


def test_a_dry_run_refuses_what_the_run_would_refuse(tmp_path, source):
    # a dry run said OK (exit 0) to an occupied -o, an -o that is the recipe itself, a missing model or data;
    # the real run then refused each of them
    from mimc.cli.app import app

    model, data = source
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": data, "stages": [{"prune": {"ratio": 0.5}}]}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    for name, change in (("missing-model", {"model": str(tmp_path / "nope")}), ("missing-data", {"data": str(tmp_path / "nope.npz")})):
        stages = [{"sparsify": {"method": "wanda", "n_calib": 8}}]  # a stage that reads the images
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"model": model, "data": data, "stages": stages, **change}))
    runner = CliRunner()
    for args, match in (([str(path), "-o", str(tmp_path / "full")], "already exists"), ([str(path), "-o", str(path)], "is the input"),
                        ([str(tmp_path / "missing-model.yaml"), "-o", str(tmp_path / "o")], "nope"),
                        ([str(tmp_path / "missing-data.yaml"), "-o", str(tmp_path / "o")], "nope.npz")):
        dry, real = (runner.invoke(app, ["run", *args, *extra]) for extra in (["--dry-run"], []))
        assert dry.exit_code == real.exit_code == 2, (args, dry.output, real.output)
        lines = [ln for ln in dry.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0] and dry.stdout == "", (args, dry.output)
        assert "--data" not in real.stderr, real.stderr  # the recipe's key, data: not a flag nobody gave
    ok = runner.invoke(app, ["run", str(path), "-o", str(tmp_path / "full"), "--overwrite", "--dry-run"])
    assert ok.exit_code == 0 and (tmp_path / "full" / "f").is_file() and not (tmp_path / "o").exists(), ok.output


def test_an_option_refused_while_the_stages_run_is_named_by_its_recipe_key(tmp_path):
    from mimc.cli.app import app

    path = tmp_path / "r.yaml"  # macs 0.01 is known to be too small only once width meets the pruned model
    path.write_text(yaml.safe_dump({"model": "ref", "stages": [{"prune": {"ratio": 0.25}}, {"width": {"macs": 0.01}}]}))
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: recipe: stages[1].width.macs 0.01 is below"), result.stderr
    assert "raise stages[1].width.macs or lower stages[1].width.round_to" in lines[0] and "--macs" not in lines[0]
    assert not (tmp_path / "out").exists()


def test_data_given_at_replay_fills_what_the_manifest_did_not_record(tmp_path):
    from mimc.compression.nm import NMSparsityConfig
    from mimc.compression.registry import compress
    from mimc.models.resolve import load_model

    sparse, _ = compress(load_model("ref"), NMSparsityConfig(method="wanda", n_calib=8), [torch.rand(8, 3, 32, 32)])
    art = save_artifact(sparse, tmp_path / "art")
    with pytest.raises(ConfigError, match=r"need images: mimc.json does not record them, give them to the replay: mimc run --data DIR"):
        load_recipe(art)  # not "add 'data: DIR'": nobody edits a mimc.json
    recipe = load_recipe(art, data="builtin")
    assert recipe.data == "builtin" and recipe.steps[0].config == NMSparsityConfig(method="wanda", n_calib=8)
    # mimc.json has no record of the images wanda drew: the replay says so instead of implying exactness
    assert "does not record the images stage(s) ['sparsify'] drew" in recipe.note and "\n" not in recipe.note


def test_replaying_a_folder_that_is_not_an_artifact_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="not a mimc artifact"):
        load_recipe(tmp_path)


@pytest.mark.parametrize("stages, match", [
    ([{"tokens": {"method": "topk", "keep": 0.5, "at": 3}}], "stages[0].tokens.at must be a list, got 3: write [3]"),
    (["export", {"profile": {"batch_sizes": 4}}], "stages[1].profile.batch_sizes must be a list"),
    (["export", {"profile": {"iters": "many"}}], "stages[1].profile.iters must be an integer, got 'many'"),
    ([{"eval": {"graph": "model.int8.onnx"}}], "reads graph 'model.int8.onnx', which no earlier stage writes: add an export"),
    ([{"profile": {"graph": "model.onnx"}}, "export"], "which no earlier stage writes"),
    (["export", {"eval": {"graph": "model.int8.onnx"}}], "choose one of ['model.onnx']"),
    ([{"export": {"batch": 1}}, {"profile": {"batch_sizes": [4]}}], "give the export stage batch: dynamic, or profile batch_sizes: [1]"),
    (["export", {"quantize": {"target": "tensorrt"}}, {"profile": {"device": "cpu"}}], "a TensorRT Q/DQ graph, on ONNX Runtime CPU"),
])
def test_option_values_of_the_wrong_shape_are_named_before_any_work(stages, match):
    # before: "'int' object is not iterable", "'<' not supported ...", a missing graph found only
    # after every model stage had run, or a TensorRT graph timed as CPU fp32 emulation
    with pytest.raises(ConfigError) as info:
        parse_recipe({"model": "ref", "data": "builtin", "stages": stages})
    assert match in str(info.value) and "\n" not in str(info.value)


def test_a_quoted_export_batch_is_resolved_to_the_integer_the_graph_gets():
    recipe = parse_recipe({"model": "ref", "stages": [{"export": {"batch": "2"}}]})
    assert recipe.steps[0].config.batch == 2 and recipe.to_dict()["stages"][0]["export"]["batch"] == 2


def test_masked_distillation_after_tokens_is_refused_before_any_stage_runs(tmp_path, monkeypatch, source):
    import mimc.compression.registry as registry

    model, data = source
    monkeypatch.setattr(registry, "compress", lambda *a, **k: pytest.fail("a stage ran before the recipe was refused"))
    recipe = parse_recipe({"model": model, "data": data, "n": 8, "stages": [{"tokens": {"method": "drop", "keep": 0.5}}, {"distill": {"steps": 1}}]})
    with pytest.raises(ConfigError, match=r"stages\[1\]\.distill masks 75% .* a tokens stage comes before it: set mask_ratio: 0"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overwriting_the_recipes_own_model_is_refused_and_leaves_it_intact(tmp_path, monkeypatch, source):
    model, _ = source
    before = {p.name: p.read_bytes() for p in Path(model).iterdir()}
    recipe = parse_recipe({"model": model, "stages": [{"prune": {"ratio": 0.5}}]})
    with pytest.raises(BadInputError, match="is the recipe's model"):
        run_recipe(recipe, model, overwrite=True)
    assert {p.name: p.read_bytes() for p in Path(model).iterdir()} == before
    # 'ref' names the built-in model even where a folder called ref exists: not the source
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "old.txt").write_text("x")
    run_recipe(parse_recipe({"model": "ref", "stages": [{"prune": {"ratio": 0.5}}]}), "ref", overwrite=True)
    assert (tmp_path / "ref" / "mimc.json").is_file()


def test_a_failure_in_a_late_stage_leaves_the_previous_output_untouched(tmp_path, monkeypatch, source):
    from mimc.pipeline import graph_stages

    model, _ = source
    out = tmp_path / "out"
    recipe = parse_recipe({"model": model, "stages": [{"prune": {"ratio": 0.5}}, "export", {"eval": {"n": 4}}]})
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("late failure")

    monkeypatch.setitem(graph_stages.GRAPH_HANDLERS, "eval", boom)
    with pytest.raises(RuntimeError):
        run_recipe(recipe, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_manifest_distilled_from_another_teacher_says_the_replay_uses_the_source(tmp_path):
    from mimc.artifact import StageRecord
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.distill import DistillConfig
    from mimc.compression.registry import compress
    from mimc.models.resolve import load_model

    pruned, _ = compress(load_model("ref"), BlockPruningConfig(keep=3, criterion="l2"))
    record = StageRecord(name="distill", config=DistillConfig(steps=1).to_dict(), config_version=1,
                         metrics={"teacher": "facebook/vit-mae-large"}, seconds=0.0, parent_hash="")
    pruned.manifest = pruned.manifest.with_stage(record, pruned.config.to_dict())  # as `mimc distill --teacher` records it
    recipe = load_recipe(save_artifact(pruned, tmp_path / "art"), data="builtin")
    assert "distill learned from ['facebook/vit-mae-large'], the replay distills from ref" in recipe.note


def test_the_profile_baseline_is_exported_like_the_graph_it_is_compared_with(tmp_path, monkeypatch, source):
    import mimc.deploy.onnx as onnx_export

    model, _ = source
    calls, original = [], onnx_export.export_onnx

    def spy(encoder, path, **kwargs):
        calls.append((Path(path).name, kwargs))
        return original(encoder, path, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    recipe = parse_recipe({"model": model, "stages": [{"export": {"batch": 2, "opset": 18}}, {"profile": {"warmup": 0, "iters": 1}}]})
    report = run_recipe(recipe, tmp_path / "out")
    baseline = dict(calls)["dense.onnx"]
    assert (baseline["batch"], baseline["opset"], baseline["exporter"]) == (2, 18, "torchscript")  # was opset 17
    assert report["stages"][-1]["baseline"]["results"][0]["batch"] == 2


def test_the_speedup_is_timed_at_the_threads_the_profile_reports(tmp_path, monkeypatch, source):
    """The interleaved dense/result timing behind speedup_vs_dense ran at every core (threads None)
    while the reported latencies used the device profile's threads."""
    import mimc.runtime.ort as ort
    from mimc.latency.devices import load_profile

    seen, original = [], ort.runner
    monkeypatch.setattr(ort, "runner", lambda path, threads=None, warmup=3: seen.append(threads) or original(path, threads, warmup))
    device = tmp_path / "one-thread.yaml"
    device.write_text(yaml.safe_dump({**load_profile("cpu").to_dict(), "name": "one-thread", "threads": 1}))
    stages = ["export", {"profile": {"device": str(device), "warmup": 0, "iters": 1}}]
    profile = run_recipe(parse_recipe({"model": source[0], "stages": stages}), tmp_path / "out")["stages"][-1]
    assert profile["result"]["threads"] == profile["baseline"]["threads"] == 1 and seen == [1, 1]


def test_data_mapping_carries_reading_options_and_round_trips(tmp_path):
    from mimc.pipeline.recipe import parse_recipe

    body = {"model": "ref", "data": {"path": "builtin", "workers": 0, "skip_corrupt": True, "label_column": "y"},
            "stages": [{"prune": {"ratio": 0.5}}]}
    recipe = parse_recipe(body)
    assert recipe.data == "builtin" and recipe.data_options == {"workers": 0, "skip_corrupt": True, "label_column": "y"}
    assert parse_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()
    assert parse_recipe({**body, "data": "builtin"}).to_dict()["data"] == "builtin"  # plain form stays plain
    for bad, words in (({"path": "builtin", "workers": -1}, "data.workers"), ({"path": "builtin", "threads": 2}, "unknown key"),
                       ({"workers": 2}, "data.path"), ({"path": "builtin", "skip_corrupt": "yes"}, "data.skip_corrupt")):
        with pytest.raises(ConfigError, match=words):
            parse_recipe({**body, "data": bad})


def test_an_eval_stage_with_val_classifies_val_against_the_data_gallery(tmp_path):
    """`eval: {val: ...}` is `mimc eval --val` inside a recipe: data is the labelled gallery, val the
    queries (fidelity on val); a val that cannot be read is refused before any stage runs."""
    rng = np.random.default_rng(0)
    for name, count in (("train", 40), ("val", 20)):
        np.savez(tmp_path / f"{name}.npz", images=(rng.random((count, 32, 32, 3)) * 255).astype(np.uint8), labels=np.arange(count) % 2)
    stages = [{"prune": {"ratio": 0.5}}, "export", {"eval": {"val": str(tmp_path / "val.npz")}}]
    report = run_recipe(parse_recipe({"model": "ref", "data": str(tmp_path / "train.npz"), "stages": stages}), tmp_path / "out")
    ev = report["stages"][-1]
    assert ev["knn_protocol"] == "gallery-query" and (ev["knn_gallery_size"], ev["knn_query_size"]) == (40, 20)
    assert ev["fidelity"]["n_images"] == 20  # measured on val
    assert load_recipe(tmp_path / "out" / "recipe.yaml").steps[-1].config.val == str(tmp_path / "val.npz")
    # recipes without val keep their resolved form
    assert "val" not in parse_recipe({"model": "ref", "stages": ["export", "eval"]}).to_dict()["stages"][-1]["eval"]
    stages[-1] = {"eval": {"val": str(tmp_path / "missing.npz")}}
    with pytest.raises(ConfigError, match=r"stages\[2\]\.eval\.val: .*missing\.npz"):
        run_recipe(parse_recipe({"model": "ref", "data": str(tmp_path / "train.npz"), "stages": stages}), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_a_recipe_under_torchrun_is_refused_before_any_work(tmp_path, monkeypatch, source):
    # every rank ran every stage and wrote the output: the first won, the others failed on the occupied folder
    import mimc.compression.registry as registry

    model, data = source
    monkeypatch.setattr(registry, "compress", lambda *a, **k: pytest.fail("a stage ran before the recipe was refused"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = parse_recipe({"model": model, "data": data, "n": 8, "stages": [{"prune": {"ratio": 0.5}}, {"distill": {"steps": 1}}]})
    with pytest.raises(ConfigError, match="a recipe runs in one process and torchrun started 2: run mimc run without torchrun"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_replaying_an_artifact_into_itself_is_refused_and_leaves_it_intact(tmp_path, source):
    from mimc.cli.app import app

    model, _ = source
    art = tmp_path / "art"
    run_recipe(parse_recipe({"model": model, "stages": [{"prune": {"ratio": 0.5}}]}), art)
    before = {p.name: p.read_bytes() for p in Path(art).iterdir()}
    for output in (art, art / "sub"):  # the artifact replayed, or a folder inside it
        result = CliRunner().invoke(app, ["run", str(art), "-o", str(output), "--overwrite"])
        assert result.exit_code == 2 and "input" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.output
    assert {p.name: p.read_bytes() for p in Path(art).iterdir()} == before



@pytest.mark.parametrize("text, match", [
    ("model: ref\n1: a\nfoo: b\nstages: [export]\n", "unknown key(s) [1, 'foo']"),
    ("model: ref\ndata: {path: builtin, 1: a, foo: b}\nstages: [export]\n", "unknown key(s) [1, 'foo'] in 'data'"),
    ("model: ref\nstages: [{prune: {ratio: 0.5, 1: a, foo: b}}]\n", "unknown option(s) [1, 'foo'] for stage 'prune'"),
])
def test_unknown_keys_of_mixed_types_are_named(tmp_path, text, match):
    # before: a TypeError traceback ('<' not supported between 'int' and 'str') from sorting them
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert match in str(info.value)


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    # before: PyYAML's YAML 1.1 floats need a dot, so lr: 1e-4 was the string '1e-4' and refused
    # as "stages[0].distill.lr must be a number, got '1e-4'"
    path = tmp_path / "r.yaml"
    path.write_text("model: ref\ndata: builtin\nstages: [{prune: {ratio: 0.5}}, {distill: {lr: 1e-4, min_lr: 2E-6, weight_decay: +5e+0}}]\n")
    config = load_recipe(path).steps[1].config
    assert (config.lr, config.min_lr, config.weight_decay) == (1e-4, 2e-6, 5.0)


def test_a_graph_quantized_with_a_seed_replays_with_that_seed(tmp_path):
    # before: mimc.json did not record quantize --seed, so the replay drew other calibration images with
    # seed 0 and silently wrote a different model.int8.onnx
    import mimc

    art = tmp_path / "art"
    run_recipe(parse_recipe({"model": "ref", "stages": [{"prune": {"ratio": 0.5}}, "export"]}), art)
    (art / "recipe.yaml").unlink()  # as if built command by command: the replay reads mimc.json
    mimc.quantize(str(art), "builtin", n=16, seed=3)
    recipe = recipe_from_artifact(art)
    assert recipe.seed == 3
    run_recipe(recipe, tmp_path / "again")
    assert (tmp_path / "again" / "model.int8.onnx").read_bytes() == (art / "model.int8.onnx").read_bytes()


def test_graphs_a_recipe_cannot_hold_are_named_in_the_replays_note(tmp_path):
    # before: an artifact with two quantized graphs replayed as a recipe with the first by name (here the
    # n=8 options, written as model.int8.onnx), and `mimc run DIR --dry-run` said nothing of the other
    import mimc

    art = tmp_path / "art"
    run_recipe(parse_recipe({"model": "ref", "data": "builtin", "stages": [{"prune": {"ratio": 0.5}}, "export", {"quantize": {"n": 16}}]}), art)
    (art / "recipe.yaml").unlink()  # as if built command by command: the replay reads mimc.json
    mimc.quantize(str(art), "builtin", str(art / "model.b.int8.onnx"), n=8)  # sorts before model.int8.onnx
    recipe = recipe_from_artifact(art)
    assert [s.name for s in recipe.steps] == ["prune", "export", "quantize"]
    assert recipe.steps[2].config.n == 16 and "the replay makes ['model.onnx', 'model.int8.onnx'], not ['model.b.int8.onnx']" in recipe.note, recipe.note


def test_the_written_recipe_names_local_paths_so_it_replays_from_any_folder(tmp_path, monkeypatch, source):
    # before: recipe.yaml kept 'model: src' as written, relative to the folder the run started in, so a
    # replay from another folder found no model (or another folder's 'src')
    model, data = source
    monkeypatch.chdir(tmp_path)
    run_recipe(parse_recipe({"model": "src", "data": "data.npz", "n": 8, "stages": [{"prune": {"ratio": 0.5}}]}), "out")
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert (written["model"], written["data"]) == (model, data)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_recipe(load_recipe(tmp_path / "out"), "again")
    assert (tmp_path / "elsewhere" / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_an_artifacts_mimc_json_given_as_the_recipe_replays_the_artifact(tmp_path, source):
    # README: `mimc run OUT` replays it "(or any artifact's mimc.json)"; given the file itself it was read
    # as a recipe: "unknown key(s) ['encoder', 'files', 'format_version', ...]"
    model, _ = source
    run_recipe(parse_recipe({"model": model, "stages": [{"prune": {"ratio": 0.5}}]}), tmp_path / "art")
    assert load_recipe(tmp_path / "art" / MANIFEST_NAME).to_dict() == load_recipe(tmp_path / "art").to_dict()


def test_an_unquoted_n_m_pattern_is_text(tmp_path):
    # before: YAML 1.1 reads 2:4 as the base-60 integer 124: "stages[0].sparsify.pattern must be a string, got 124"
    path = tmp_path / "r.yaml"
    path.write_text("model: ref\ndata: builtin\nstages: [{sparsify: {pattern: 2:4, method: wanda}}]\n")
    assert load_recipe(path).steps[0].config.pattern == "2:4"


@pytest.mark.parametrize("value", ["!!int abc", "!!float x", "!!timestamp x", "!!int 1:30", "!!set {a}", "!!binary aGk="])
def test_explicit_tags_are_refused_in_one_line(tmp_path, value):
    # before: '!!int abc' and '!!float x' were a ValueError traceback, '!!timestamp x' an AttributeError
    # one, and '!!int 1:30' read YAML 1.1's base 60 (90) that an untagged 1:30 no longer does
    path = tmp_path / "r.yaml"
    path.write_text(f"model: ref\ndata: builtin\nseed: {value}\nstages: [{{prune: {{ratio: 0.5}}}}]\n")
    with pytest.raises(BadInputError, match=r"not valid YAML at line 3 \(tags .* are not allowed"):
        load_recipe(path)


def test_a_leading_zero_is_decimal(tmp_path):
    # before: YAML 1.1 reads 010 as octal, so iters: 010 silently ran 8 iterations (and seed: 010 was seed 8)
    path = tmp_path / "r.yaml"
    path.write_text("model: ref\ndata: builtin\nseed: 010\nstages: [export, {profile: {iters: 010, warmup: 0x10}}]\n")
    recipe = load_recipe(path)
    assert (recipe.seed, recipe.steps[1].config.iters, recipe.steps[1].config.warmup) == (10, 10, 16)


def test_single_commands_record_local_paths_so_their_artifact_replays_from_any_folder(tmp_path, monkeypatch, source):
    # before: `mimc prune vit.safetensors` recorded source id 'vit.safetensors' and `mimc quantize --calib
    # data.npz` its calibration_source as typed, so `mimc run OUT` from another folder found no model
    # (or another folder's file of that name)
    import mimc
    from safetensors.torch import save_file

    save_file(dict(build_encoder(tiny_config(), seed=2).state_dict()), str(tmp_path / "vit.safetensors"), metadata={"num_heads": "4"})
    monkeypatch.chdir(tmp_path)
    mimc.prune("vit.safetensors", "out", ratio=0.5)
    mimc.quantize("out", "data.npz", n=8)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = recipe_from_artifact(tmp_path / "out")
    assert (recipe.model, recipe.data) == (str(tmp_path / "vit.safetensors"), str(tmp_path / "data.npz"))
    run_recipe(recipe, "again")
    assert (tmp_path / "elsewhere" / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_a_replay_says_whether_it_reproduced_the_artifact(tmp_path, source, tiny_images):
    # the replay's promise (byte for byte) was only checked by tests: mimc run ART now reports, per
    # file both artifacts hold, whether the rebuilt one is identical
    import mimc

    model, data = source
    art = tmp_path / "art"
    run_recipe(parse_recipe({"model": model, "data": data, "n": 16, "stages": [{"prune": {"ratio": 0.5}}, "export", {"quantize": {"n": 16}}]}), art)
    report = mimc.run(str(art), tmp_path / "again")
    assert report["replay"] == {"of": str(art), "identical": ["model.safetensors", "model.onnx", "model.int8.onnx"], "differ": []}
    other = tmp_path / "other.npz"
    np.savez(other, images=np.ascontiguousarray(tiny_images[0][::-1]) // 2, labels=tiny_images[1])
    report = mimc.run(str(art), tmp_path / "moved", data=str(other))  # calibrated on other images
    assert report["replay"]["differ"] == ["model.int8.onnx"] and "model.safetensors" in report["replay"]["identical"]
    assert "replay" not in mimc.run(str(art / "recipe.yaml"), tmp_path / "fresh")  # a recipe file is not a replay


def test_a_relative_shard_pattern_is_recorded_absolute_so_it_replays_from_any_folder(tmp_path, monkeypatch, source, tiny_images):
    # before: 'data: shards/train-{000..001}.tar' was recorded as typed (a pattern names no existing
    # path, which recorded_path took for a hub id), so `mimc run OUT` from another folder found no shard
    import io
    import tarfile

    from PIL import Image

    model, _ = source
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with tarfile.open(tmp_path / "shards" / f"train-{s:03d}.tar", "w") as tar:
            for i in range(4):
                buf = io.BytesIO()
                Image.fromarray(tiny_images[0][4 * s + i]).save(buf, format="PNG")
                info = tarfile.TarInfo(f"s{s}{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    monkeypatch.chdir(tmp_path)
    run_recipe(parse_recipe({"model": model, "data": "shards/train-{000..001}.tar", "n": 8,
                             "stages": [{"sparsify": {"pattern": "2:4", "method": "wanda", "n_calib": 8}}]}), "out")
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["data"] == str(tmp_path / "shards" / "train-{000..001}.tar")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_recipe(load_recipe(tmp_path / "out"), "again")
    assert (tmp_path / "elsewhere" / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_an_eval_stages_relative_val_is_recorded_absolute_so_it_replays_from_any_folder(tmp_path, monkeypatch, source, tiny_images):
    # before: 'eval: {val: val.npz}' was written into recipe.yaml as typed, so `mimc run OUT` from another
    # folder was refused: "stages[1].eval.val: data path val.npz does not exist"
    model, _ = source
    images, labels = tiny_images
    np.savez(tmp_path / "val.npz", images=images[:6], labels=labels[:6])
    monkeypatch.chdir(tmp_path)
    run_recipe(parse_recipe({"model": model, "data": "data.npz", "stages": ["export", {"eval": {"val": "val.npz"}}]}), "out")
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["stages"][1]["eval"]["val"] == str(tmp_path / "val.npz")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_recipe(load_recipe(tmp_path / "out"), "again")


def test_force_without_a_quantize_stage_is_refused(tmp_path):
    # --force keeps a quantized graph that misses its gate: on a recipe with no quantize stage it did nothing, silently
    from mimc.cli.app import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "ref", "stages": [{"prune": {"ratio": 0.5}}, "export"]}))
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "out"), "--force", *extra])
        assert result.exit_code == 2 and "--force" in result.stderr and "quantize" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_a_stage_refused_while_the_run_goes_is_named_even_when_no_option_is_to_blame(tmp_path, monkeypatch):
    # an error naming no option (a token-reduced model met a prune stage) came out bare, without the stage it stopped
    import mimc.compression.registry as registry

    def refuse(encoder, config, *args, **kwargs):
        raise ConfigError("this model cannot take it: fix the model")

    monkeypatch.setattr(registry, "compress", refuse)
    with pytest.raises(ConfigError) as info:
        run_recipe(parse_recipe({"model": "ref", "stages": [{"prune": {"ratio": 0.5}}, "export"]}), tmp_path / "out")
    assert str(info.value) == "recipe: stages[0].prune: this model cannot take it: fix the model" and not (tmp_path / "out").exists()


def test_paths_named_by_stage_options_are_written_absolute_too(tmp_path, monkeypatch, source):
    # model and data were made absolute in recipe.yaml, eval's val and a profile .yaml were not: the
    # replay from another folder was refused (val does not exist) or timed another folder's profile
    from mimc.pipeline.recipe_run import check_recipe_run

    model, data = source
    (tmp_path / "dev.yaml").write_text((Path(__file__).parents[2] / "mimc" / "profiles" / "cpu.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe({"model": "src", "data": "data.npz", "stages": ["export", {"profile": {"device": "dev.yaml"}},
                                                                         {"eval": {"val": "data.npz"}}]})
    stages = check_recipe_run(recipe, "out")[0].to_dict()["stages"]
    assert (stages[1]["profile"]["device"], stages[2]["eval"]["val"]) == (str(tmp_path / "dev.yaml"), data)


@pytest.mark.parametrize("second", [{"prune": {"ratio": 0.5}}, {"tokens": {"method": "drop", "keep": 0.5}}])
def test_a_stage_a_token_reduced_model_cannot_take_is_refused_before_any_stage_runs(tmp_path, second):
    # --dry-run said OK and the run refused it once the stages before it had run
    from mimc.pipeline.recipe_run import check_recipe_run

    recipe = parse_recipe({"model": "ref", "stages": [{"tokens": {"method": "topk", "keep": 0.5}}, second]})
    with pytest.raises(ConfigError, match=rf"recipe: stages\[1\]\.{next(iter(second))}: "):
        check_recipe_run(recipe, tmp_path / "out")


def test_an_empty_data_is_refused_not_read_as_the_folder_the_run_starts_in(tmp_path, monkeypatch):
    # `data: ""` (a template's unset variable) was recorded as the absolute current folder and its images read
    from mimc.cli.app import app

    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "ref", "data": "", "stages": [{"sparsify": {"method": "wanda", "n_calib": 8}}]}))
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2 and "data is empty" in result.stderr, result.output
