"""Search: every candidate built and measured, a consistent Pareto front, the right pick, a runnable recipe."""
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = (rng.random((40, 32, 32, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("s") / "d.npz"
    np.savez(path, images=images, labels=np.arange(40) % 2)
    enc = build_encoder(tiny_config(), seed=0)
    data = load_images(path, enc.config, n=40, seed=0)
    return enc, data.subset(np.arange(16)), data.subset(np.arange(16, 40)), path


def check_front(result):
    ok = [c for c in result["candidates"] if c["error"] is None]
    for c in ok:
        dominated = any(o is not c and o["latency_ms"] <= c["latency_ms"] and o["pooled_cosine_mean"] >= c["pooled_cosine_mean"]
                        and (o["latency_ms"] < c["latency_ms"] or o["pooled_cosine_mean"] > c["pooled_cosine_mean"]) for o in ok)
        assert c["pareto"] == (not dominated), c
    faithful = [c for c in ok if c["pooled_cosine_mean"] >= result["min_cosine"]]
    assert result["best"]["latency_ms"] == min(c["latency_ms"] for c in faithful)


def test_measured_cpu_search_builds_every_candidate_and_picks_the_fastest_faithful(setup):
    enc, calib, held, _ = setup
    space = SearchSpace(block_ratios=(0.0, 0.5), token_keeps=(1.0, 0.5), runtimes=("ort",))  # the runtimes: test_search_openvino
    result = search(enc, "cpu", held, calib, space, min_cosine=0.9, budget_ms=1e6, iters=3)
    cands = {c["label"]: c for c in result["candidates"]}
    assert len(cands) == 8 and all(c["error"] is None and c["latency"] == "measured" for c in cands.values())
    assert cands["all blocks, tokens 100%, fp32"]["pooled_cosine_mean"] >= 0.9999  # the dense model itself
    assert cands["blocks -50%, tokens 100%, fp32"]["gmacs"] < 0.6 * cands["all blocks, tokens 100%, fp32"]["gmacs"]
    for label, c in cands.items():  # int8 moves features a little, never more than the structure did
        if label.endswith("int8"):
            assert abs(c["pooled_cosine_mean"] - cands[label.replace("int8", "fp32")]["pooled_cosine_mean"]) < 0.02
    check_front(result)
    assert result["meets_budget"] is True
    recipe = parse_recipe(recipe_of(result, "ref", "builtin", 16, 0))
    assert [s.name for s in recipe.steps][-2:] == ["profile", "eval"]
    assert ("quantize" in [s.name for s in recipe.steps]) == result["best"]["label"].endswith("int8")


def test_predicted_gpu_search_adds_2_4_and_gpu_precisions(setup):
    enc, calib, held, _ = setup
    result = search(enc, "h100", held, calib, SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,)), min_cosine=0.9)
    cands = {c["label"]: c for c in result["candidates"]}
    assert set(cands) == {f"all blocks, tokens 100%{nm}, {p}" for nm in ("", ", 2:4") for p in ("fp16", "int8", "fp8")}
    assert all(c["latency"] == "predicted" for c in cands.values())
    for p in ("fp16", "int8", "fp8"):  # sparse tensor cores: the roofline credits 2:4 weights
        assert cands[f"all blocks, tokens 100%, 2:4, {p}"]["latency_ms"] <= cands[f"all blocks, tokens 100%, {p}"]["latency_ms"]
    check_front(result)
    recipe = recipe_of(result, "ref", "builtin", 16, 0)
    if result["best"]["precision"] == "fp16":
        assert recipe["stages"][-2]["profile"]["precision"] == "fp16"
    parse_recipe(recipe)


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "cpu", "space": SearchSpace(precisions=("fp16",), runtimes=("ort",))}, "ONNX Runtime CPU runs fp32 and int8"),
    ({"device": "cpu", "space": SearchSpace(nm=True)}, "no sparse tensor cores"),
    ({"device": "t4", "space": SearchSpace(precisions=("fp8",))}, "cannot run ['fp8']"),
    ({"device": "cpu", "min_cosine": 0.0}, "min_cosine must be in"),
    # options a predicted search did nothing with were ignored: iters (it times nothing), runtimes ort (TensorRT candidates)
    ({"device": "h100", "iters": 5}, "drop iters"),
    ({"device": "h100", "space": SearchSpace(runtimes=("ort",))}, "drop runtimes"),
    ({"device": "cpu", "predict": True, "space": SearchSpace(runtimes=("ort",))}, "drop runtimes"),
    ({"device": "openvino-cpu"}, "give device cpu"),  # was predicted as a TensorRT device (int8 for target tensorrt)
])
def test_impossible_searches_are_refused(setup, kwargs, match):
    enc, calib, held, _ = setup
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")):
        search(enc, images=held, calib=calib, **kwargs)


def test_search_space_is_checked():
    # precisions (): was searched as the default, the empty list silently ignored (--precisions ,)
    # width_criterion without width_macs: was ignored (it ranks only the width_macs candidates)
    for bad in ({"block_ratios": (1.0,)}, {"token_keeps": (0.0,)}, {"block_ratios": ()}, {"precisions": ()}, {"width_criterion": "optin"}):
        with pytest.raises(ConfigError):
            SearchSpace(**bad)


def test_cli_writes_the_table_json_and_a_recipe_and_refuses_bad_input(tmp_path, setup):
    from mimc.cli.app import app

    enc, _, _, data = setup
    model = save_artifact(enc, tmp_path / "m")
    out = tmp_path / "search"
    args = ["search", str(model), "--device", "jetson-orin", "--data", str(data), "--n", "8", "--n-eval", "8",
            "--blocks", "0,0.5", "--keep", "1", "--precisions", "fp16", "--no-nm", "--min-cosine", "0.5", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "search.json").read_text())
    assert len(report["candidates"]) == 2 and report["best"] is not None
    assert parse_recipe(yaml.safe_load((out / "recipe.yaml").read_text())).model == str(model)
    again = CliRunner().invoke(app, args)
    bad = CliRunner().invoke(app, args[:-2] + ["-o", str(tmp_path / "b"), "--blocks", "0,x"])  # the last --blocks wins
    for res, match in ((again, "already exists"), (bad, "comma-separated numbers")):
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0], res.stderr
    assert not (tmp_path / "b").exists()


def test_without_output_the_default_folder_is_documented_and_named_even_when_nothing_is_faithful(tmp_path, setup, monkeypatch):
    """search wrote ./<model>-search without -o, which --help did not say, and a search with no faithful
    candidate did not say where its search.json went (the next run was refused: 'already exists')."""
    from mimc.cli.app import app
    from tests.cli.conftest import invoke

    enc, _, _, data = setup
    model = save_artifact(enc, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert "(default ./<model>-search)" in invoke(app, ["search", "--help"]).output
    result = invoke(app, ["search", str(model), "--device", "jetson-orin", "--data", str(data), "--n", "8", "--n-eval", "8",
                                      "--blocks", "0.5", "--keep", "1", "--precisions", "fp16", "--no-nm", "--min-cosine", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m-search" / "search.json").read_text())["best"] is None
    assert "wrote m-search/search.json" in result.output


def test_repeated_grid_values_are_searched_once_and_labels_keep_small_fractions():
    space = SearchSpace(block_ratios=(0.0, 0, 0.5), token_keeps=(1, 1.0, 0.5), precisions=("fp32", "fp32"))
    assert space.block_ratios == (0.0, 0.5) and space.token_keeps == (1, 0.5) and space.precisions == ("fp32",)
    from mimc.pipeline.search import Candidate

    assert Candidate(0.001, 0.001, False, "fp32").label == "blocks -0.1%, tokens 0.1%, fp32"  # was "-0%", "0%"


@pytest.mark.parametrize("budget", [0, float("inf")])  # inf: met by anything, and written as Infinity, which is not JSON
def test_non_positive_or_infinite_budget_is_refused(setup, budget):
    enc, calib, held, _ = setup
    with pytest.raises(ConfigError, match="budget_ms must be a positive number"):
        search(enc, "cpu", held, calib, SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,)), budget_ms=budget)


@pytest.mark.parametrize("kwargs", [{"min_cosine": "0.9"}, {"min_cosine": True}, {"budget_ms": "5"}, {"budget_ms": True}])
def test_a_threshold_that_is_not_a_number_is_refused_naming_it(setup, kwargs):
    # before: a str was a TypeError traceback ('<' not supported ...), True passed as min_cosine 1 / budget 1 ms
    enc, calib, held, _ = setup
    with pytest.raises(ConfigError) as info:
        search(enc, "cpu", held, calib, SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,)), **kwargs)
    assert info.value.options == tuple(kwargs)


def test_the_written_recipe_names_a_profile_file_by_path_and_keeps_the_calibration_count(tmp_path):
    from mimc.quant.quantize import QuantizeConfig

    profile = tmp_path / "mygpu.yaml"
    profile.write_text(yaml.safe_dump({"name": "mygpu", "description": "x", "backend": "tensorrt", "compute_capability": "8.0",
                                       "precisions": ["fp32", "fp16", "int8"], "sparse_tensor_cores": False,
                                       "peak_tflops": {"fp32": 10, "fp16": 80, "int8": 160}, "memory_bandwidth_gbs": 300,
                                       "memory_gb": 16, "batch_sizes": [1]}))
    result = {"device": "mygpu", "latency": "predicted (roofline)", "best": {"precision": "int8"},
              "best_stages": [{"export": {"batch": 1}}, {"quantize": QuantizeConfig(n=16, target="tensorrt").to_dict()}]}
    recipe = parse_recipe(recipe_of(result, "ref", "builtin", 16, 0, device=str(profile)))  # was: unknown device 'mygpu'
    by = {s.name: s.config for s in recipe.steps}
    assert by["profile"].device == str(profile) and by["quantize"].n == 16  # was the default 256


def test_measured_candidates_are_timed_in_alternating_rounds_not_one_after_another(setup, monkeypatch):
    import mimc.runtime.ort as ort  # runner makes its sessions there

    enc, calib, held, _ = setup
    order, original = [], ort.make_session

    class Recorded:
        def __init__(self, path, **kwargs):
            self.sess, self.path = original(path, **kwargs), str(path)

        def __getattr__(self, name):
            return getattr(self.sess, name)

        def run(self, *args):
            order.append(self.path)
            return self.sess.run(*args)

    monkeypatch.setattr(ort, "make_session", lambda path, **kwargs: Recorded(path, **kwargs))
    space = SearchSpace(block_ratios=(0.0, 0.5), token_keeps=(1.0,), precisions=("fp32",), runtimes=("ort",))
    result = search(enc, "cpu", held, calib, space, iters=4)
    graphs = list(dict.fromkeys(order))
    assert len(graphs) == 2 and all(order.count(g) >= 4 for g in graphs)
    # each candidate's timed runs are split into several blocks with the other's in between
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches >= 3 and all(c["latency_ms"] > 0 and c["latency"] == "measured" for c in result["candidates"])


def test_mlp_width_is_a_search_dimension_and_its_recipe_runs_the_width_stage(setup):
    enc, calib, held, _ = setup
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("fp16",), nm=False, mlp_ratios=(0.0, 0.5))
    result = search(enc, "jetson-orin", held, calib, space, min_cosine=0.5)
    by = {c["label"]: c for c in result["candidates"]}
    narrow, full = by["MLP -50%, all blocks, tokens 100%, fp16"], by["all blocks, tokens 100%, fp16"]
    assert narrow["gmacs"] < full["gmacs"] and narrow["latency_ms"] < full["latency_ms"] and narrow["pooled_cosine_mean"] < 1.0
    assert result["best"]["label"] == narrow["label"]  # both pass 0.5; the narrow one is faster
    first = parse_recipe(recipe_of(result, "ref", "builtin", 16, 0)).steps[0]
    assert first.name == "width" and first.config.mlp == 0.5 and first.config.criterion == "activation"
    with pytest.raises(ConfigError, match=r"mlp_ratios must hold values in \[0, 1\)"):
        SearchSpace(mlp_ratios=(1.0,))


@pytest.mark.parametrize("criterion", ["l2", "optin"])
def test_a_global_width_allocation_is_a_search_dimension(setup, criterion):
    enc, calib, held, _ = setup
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), mlp_ratios=(0.0,), width_macs=(0.7,),
                        width_criterion=criterion, precisions=("fp32",))
    result = search(enc, "h100", held, calib, space, min_cosine=0.5)
    by_macs = {c["width_macs"]: c for c in result["candidates"]}
    assert set(by_macs) == {None, 0.7} and all(c["error"] is None for c in by_macs.values())
    dense, narrow = by_macs[None], by_macs[0.7]
    assert f"width MACs x0.7 ({criterion})" in narrow["label"]
    assert 0.6 * dense["gmacs"] < narrow["gmacs"] <= 0.7 * dense["gmacs"] + 1e-4  # the budget, within one rounding step
    if result["best"]["width_macs"] == 0.7:
        width = next(s["width"] for s in result["best_stages"] if "width" in s)
        assert width["macs"] == 0.7 and width["criterion"] == criterion


def test_without_openvino_the_default_measures_ort_and_says_what_was_skipped(setup, tmp_path, monkeypatch):
    import sys

    from mimc.errors import MissingExtraError
    from tests.cli.conftest import invoke

    enc, calib, held, data = setup
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails, as where the extra is not installed
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("fp32",))  # runtimes: the default
    result = search(enc, "cpu", held, calib, space, min_cosine=0.9, iters=2)
    assert result["runtimes"] == ["ort"] and [c["runtime"] for c in result["candidates"]] == ["ort"]
    assert [(s["runtime"], s["precision"]) for s in result["skipped"]] == [("openvino", None)]
    assert "pip install 'mimc[openvino]'" in result["skipped"][0]["reason"]
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[openvino\]'"):  # asked for by name: refused
        search(enc, "cpu", held, calib, SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), runtimes=("ort", "openvino")))
    from mimc.cli.app import app

    model = save_artifact(enc, tmp_path / "m")
    cli = invoke(app, ["search", model, "--device", "cpu", "--data", data, "--n", "8", "--n-eval", "8", "--blocks", "0", "--keep", "1",
                       "--precisions", "fp32", "--iters", "2", "--min-cosine", "0.9", "-o", tmp_path / "s"])
    assert cli.exit_code == 0, cli.output
    assert "skipped openvino: OpenVINO is not installed" in cli.stdout and "pip install 'mimc[openvino]'" in cli.stdout, cli.stdout
    assert json.loads((tmp_path / "s" / "search.json").read_text())["runtimes"] == ["ort"]


def test_a_predicted_or_gpu_search_keeps_its_runtime_by_default(setup):
    enc, calib, held, _ = setup
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("fp32",))
    predicted = search(enc, "cpu", held, calib, space, min_cosine=0.5, predict=True)
    assert predicted["runtimes"] == ["ort"] and predicted["skipped"] == [] and predicted["latency"].startswith("predicted")
    gpu = search(enc, "h100", held, calib, SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("fp16",), nm=False), min_cosine=0.5)
    assert gpu["runtimes"] == ["tensorrt"] and {c["runtime"] for c in gpu["candidates"]} == {"tensorrt"}


def test_an_fp32_candidate_is_judged_through_its_onnx_graph(setup, monkeypatch):
    # README: fidelity "through the graph that would ship"; fp32 candidates were judged in torch
    import mimc.pipeline.search as search_module

    enc, calib, held, _ = setup
    through = []
    real = search_module._graph_features
    monkeypatch.setattr(search_module, "_graph_features", lambda graph, *a, **k: through.append(graph.name) or real(graph, *a, **k))
    space = SearchSpace(block_ratios=(0.0,), token_keeps=(1.0,), precisions=("fp32",), runtimes=("ort",))
    result = search(enc, "cpu", held, calib, space, min_cosine=0.9, iters=1)
    assert through == ["model.onnx"] and result["candidates"][0]["pooled_cosine_mean"] >= 0.9999


def test_the_written_recipe_names_local_paths_so_it_runs_from_any_folder(tmp_path, setup, monkeypatch):
    # a model and --data given as relative paths went into recipe.yaml as written: `mimc run OUT/recipe.yaml`
    # from any other folder was refused (model 'm' not found), unlike a profile .yaml, written by its path
    from mimc.cli.app import app
    from mimc.pipeline.recipe import load_recipe

    enc, _, _, data = setup
    save_artifact(enc, tmp_path / "m")
    (tmp_path / "d.npz").write_bytes(data.read_bytes())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["search", "m", "--device", "jetson-orin", "--data", "d.npz", "--n", "8", "--n-eval", "8",
                                      "--blocks", "0.5", "--keep", "1", "--precisions", "fp16", "--no-nm", "--min-cosine", "0.5", "-o", "s"])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(tmp_path / "s" / "recipe.yaml")
    assert (recipe.model, recipe.data) == (str(tmp_path / "m"), str(tmp_path / "d.npz"))


def test_the_written_recipe_reads_the_images_as_the_search_did(tmp_path, setup):
    # --skip-corrupt (and --workers, --image-column, --label-column) reached the search but not its recipe.yaml,
    # whose run then stopped at the unreadable image the search had skipped
    from PIL import Image

    from mimc.cli.app import app
    from mimc.pipeline.recipe import load_recipe

    enc, _, _, _ = setup
    model = save_artifact(enc, tmp_path / "m")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((32, 32, 3), i * 10, np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["search", str(model), "--device", "jetson-orin", "--data", str(folder), "--skip-corrupt", "--n", "8",
                                      "--n-eval", "8", "--blocks", "0.5", "--keep", "1", "--precisions", "fp16", "--no-nm", "--min-cosine", "0.1",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out / "recipe.yaml")
    assert (recipe.data, recipe.data_options) == (str(folder), {"skip_corrupt": True})
