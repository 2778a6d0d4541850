"""The CPU runtime as a search dimension: ORT and OpenVINO candidates measured in one process, one front, a runnable recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mimc.artifact import save_artifact
from mimc.data import load_images
from mimc.errors import ConfigError
from mimc.models.vit import build_encoder
from mimc.pipeline.recipe import parse_recipe
from mimc.pipeline.search import SearchSpace, recipe_of, search
from tests.conftest import tiny_config
from tests.pipeline.test_search import check_front

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ovs") / "d.npz"
    np.savez(path, images=(rng.random((40, 32, 32, 3)) * 255).astype(np.uint8), labels=np.arange(40) % 2)
    enc = build_encoder(tiny_config(), seed=0)
    data = load_images(path, enc.config, n=40, seed=0)
    return enc, data.subset(np.arange(16)), data.subset(np.arange(16, 40)), path


def test_ort_and_openvino_candidates_are_measured_together_on_one_front(setup, monkeypatch):
    import mimc.runtime.ort as ort
    import mimc.runtime.openvino as ov

    enc, calib, held, _ = setup
    order, ort_runner, ov_runner = [], ort.runner, ov.runner
    monkeypatch.setattr(ort, "runner", lambda path, *a, **k: (lambda f: lambda: (order.append("ort"), f()))(ort_runner(path, *a, **k)))
    monkeypatch.setattr(ov, "runner", lambda path, *a, **k: (lambda f: lambda: (order.append("ov"), f()))(ov_runner(path, *a, **k)))
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0, 0.5), runtimes=("ort", "openvino"))
    result = search(enc, "cpu", held, calib, space, min_cosine=0.9, iters=4)
    by = {(c["label"].removesuffix(", OpenVINO"), c["runtime"]): c for c in result["candidates"]}
    bf16 = ov.cpu_bf16()["supported"]
    # ORT fp32/int8; OpenVINO fp32/int8, and bf16/int8-bf16 where the CPU has bf16; two patch keeps each
    assert {r for _, r in by} == {"ort", "openvino"} and len(by) == 2 * (2 + 4 if bf16 else 2 + 2)
    assert all(c["error"] is None and c["latency"] == "measured" and c["latency_ms"] > 0 for c in by.values())
    assert result["skipped"] == [] if bf16 else [s["precision"] for s in result["skipped"]] == ["bf16", "int8-bf16"]
    for keep in ("100%", "50%"):  # fp32 on OpenVINO (f32 hint) is the fp32 graph; its int8 is mimc's calibration
        ov_fp32, ort_fp32 = by[(f"all blocks, tokens {keep}, fp32", "openvino")], by[(f"all blocks, tokens {keep}, fp32", "ort")]
        assert abs(ov_fp32["pooled_cosine_mean"] - ort_fp32["pooled_cosine_mean"]) < 1e-3
        ov_int8 = by[(f"all blocks, tokens {keep}, int8", "openvino")]
        assert abs(ov_int8["pooled_cosine_mean"] - ort_fp32["pooled_cosine_mean"]) < 0.02
    assert by[("all blocks, tokens 100%, fp32", "openvino")]["pooled_cosine_mean"] >= 0.999
    check_front(result)
    # one process, one timing loop: the runtimes alternate, neither is timed in one block
    assert set(order) == {"ort", "ov"} and sum(a != b for a, b in zip(order, order[1:])) >= 3


def test_an_openvino_best_writes_a_recipe_that_profiles_on_openvino_and_runs(setup, tmp_path):
    import mimc

    enc, calib, held, data = setup
    model = save_artifact(enc, tmp_path / "m")
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("int8",), runtimes=("openvino",))
    result = search(enc, "cpu", held, calib, space, min_cosine=0.9, iters=2)
    assert result["best"]["runtime"] == "openvino"  # the only runtime: the best is an OpenVINO candidate
    recipe = recipe_of(result, str(model), str(data), 16, 0)
    # the IR is the deployable: built at the winner's precision, then profiled and evaluated
    assert [next(iter(s)) for s in recipe["stages"]][-3:] == ["build", "profile", "eval"]
    assert recipe["stages"][-3]["build"] == {"device": "openvino-cpu", "precision": result["best"]["precision"]}
    assert recipe["stages"][-2]["profile"] == {"device": "openvino-cpu", "predict": False}  # at the IR's recorded precision
    quantize = [s["quantize"] for s in recipe["stages"] if "quantize" in s]
    assert all(q["target"] == "openvino" for q in quantize)  # the Q/DQ layout built for OpenVINO
    recipe["stages"] = [{**s, "profile": {**s["profile"], "iters": 2, "warmup": 1}} if "profile" in s else s for s in recipe["stages"]]
    report = mimc.run(recipe, tmp_path / "run").to_dict()
    by = {s["stage"]: s for s in report["stages"]}
    assert by["build"]["file"] == "model.xml" and by["build"]["precision"] == "int8"
    assert by["profile"]["file"] == "model.xml" and by["profile"]["result"]["label"] == "measured"
    assert by["profile"]["result"]["backend"] == "openvino-cpu" and by["profile"]["result"]["precision"] == "int8"
    assert by["eval"]["file"] == "model.xml" and by["eval"]["runtime"] == "openvino-cpu"  # fidelity through OpenVINO


def test_recipes_of_ort_candidates_are_unchanged_and_bad_runtimes_are_refused(setup):
    enc, calib, held, _ = setup
    result = {"device": "cpu", "latency": "measured (ONNX Runtime CPU)", "best": {"precision": "int8", "runtime": "ort"},
              "best_stages": [{"export": {"batch": 1}}]}
    assert recipe_of(result, "ref", "builtin", 16, 0)["stages"][-2:] == [{"profile": {"device": "cpu", "predict": False}}, {"eval": {}}]
    # a bf16 winner's recipe parses anywhere (whether this CPU runs bf16 is checked when it runs)
    bf16 = parse_recipe(recipe_of({**result, "best": {"precision": "bf16", "runtime": "openvino"}}, "ref", "builtin", 16, 0))
    assert [(s.name, getattr(s.config, "precision", None)) for s in bf16.steps][-3:] == [("build", "bf16"), ("profile", None), ("eval", None)]
    for kwargs, option in (({"device": "h100"}, "runtimes"), ({"device": "cpu", "predict": True}, "runtimes")):
        with pytest.raises(ConfigError) as err:
            search(enc, kwargs.pop("device"), held, calib, SearchSpace(runtimes=("ort", "openvino")), **kwargs)
        assert err.value.options == (option,)
    with pytest.raises(ConfigError, match="fp16") as err:
        search(enc, "cpu", held, calib, SearchSpace(precisions=("fp16",), runtimes=("ort", "openvino")))
    assert err.value.options == ("precisions",)
    with pytest.raises(ConfigError, match="runtimes"):
        SearchSpace(runtimes=("tensorrt",))


def test_cli_shows_a_runtime_column_and_takes_runtimes(setup, tmp_path):
    from mimc.cli.app import app

    enc, _, _, data = setup
    model = save_artifact(enc, tmp_path / "m")
    args = ["search", str(model), "--device", "cpu", "--data", str(data), "--n", "8", "--n-eval", "8", "--blocks", "0",
            "--keep", "1", "--precisions", "fp32", "--runtimes", "ort,openvino", "--iters", "2", "--min-cosine", "0.9",
            "-o", str(tmp_path / "s")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "runtime" in result.stdout and "openvino" in result.stdout, result.stdout
    report = json.loads((tmp_path / "s" / "search.json").read_text())
    assert sorted(c["runtime"] for c in report["candidates"]) == ["openvino", "ort"]
    bad = CliRunner().invoke(app, args[:-2] + ["--runtimes", "ort,tvm", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--runtimes" in bad.stderr, bad.stderr
    assert yaml.safe_load((tmp_path / "s" / "recipe.yaml").read_text())["stages"][-1] == {"eval": {}}


def test_by_default_a_cpu_search_measures_every_installed_runtime(setup, tmp_path):
    from mimc.cli.app import app
    from tests.cli.conftest import invoke

    enc, _, _, data = setup
    model = save_artifact(enc, tmp_path / "m")
    result = invoke(app, ["search", model, "--device", "cpu", "--data", data, "--n", "8", "--n-eval", "8", "--blocks", "0",
                          "--keep", "1", "--precisions", "fp32", "--iters", "2", "--min-cosine", "0.9", "-o", tmp_path / "s"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "search.json").read_text())
    assert report["runtimes"] == ["ort", "openvino"] and report["skipped"] == []  # no --runtimes: both, openvino being installed
    assert sorted(c["runtime"] for c in report["candidates"]) == ["openvino", "ort"]
    assert report["latency"] == "measured (ONNX Runtime and OpenVINO CPU, one process)"
    header = next(ln for ln in result.stdout.splitlines() if "candidate" in ln and "pooled cosine" in ln)
    assert "runtime" in header and "openvino" in result.stdout, result.stdout


def test_int8_bf16_shares_the_int8_graph_and_its_recipe_builds_at_int8_bf16(setup, monkeypatch):
    """Where the CPU has bf16 (mocked here: OpenVINO then compiles the bf16 hint as f32 on this CPU,
    which the plumbing does not depend on), int8-bf16 candidates compile the int8 graph built once."""
    import mimc.pipeline.graph_stages as gs
    import mimc.runtime.openvino as ov

    monkeypatch.setattr(ov, "cpu_bf16", lambda: {"supported": True, "cpu_flags": ["avx512_bf16"], "optimization_capabilities": ["BF16"]})
    quantized = []
    real = gs.quantize_split
    monkeypatch.setattr(gs, "quantize_split", lambda *a, **k: (quantized.append(a[4].precision), real(*a, **k))[1])
    enc, calib, held, path = setup
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), runtimes=("openvino",), precisions=("int8", "int8-bf16"))
    result = search(enc, "cpu", held, calib, space, min_cosine=0.5, iters=2)
    assert sorted(c["precision"] for c in result["candidates"]) == ["int8", "int8-bf16"] and result["skipped"] == []
    assert quantized == ["int8"]  # one graph for both
    result["best"] = next(c for c in result["candidates"] if c["precision"] == "int8-bf16")
    result["best_stages"] = result["best_stages"] or []
    stages = recipe_of(result, "ref", str(path), 16, 0)["stages"]
    assert {"build": {"device": "openvino-cpu", "precision": "int8-bf16"}} in stages
    assert next(s["quantize"] for s in stages if "quantize" in s)["precision"] == "int8"
