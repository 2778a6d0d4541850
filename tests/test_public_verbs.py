"""The package-level verbs README shows: ``mimc.run`` (a recipe) takes a mapping, a YAML path or an artifact."""
from __future__ import annotations

import pytest
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


def test_export_takes_a_path_and_an_encoder_and_leaves_the_encoder_alone(tmp_path):
    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    mimc.prune("ref", tmp_path / "a", ratio=0.5)
    report = mimc.export(tmp_path / "a")  # a pathlib.Path: into that artifact, as a str does
    assert report.path == tmp_path / "a" / "model.onnx" and report.path.is_file()
    enc = mimc.load("ref")
    before = (enc.training, enc.manifest.to_dict())
    mimc.export(enc, tmp_path / "e")
    mimc.export("ref", tmp_path / "r")
    assert (tmp_path / "e" / "model.onnx").read_bytes() == (tmp_path / "r" / "model.onnx").read_bytes()
    assert (enc.training, enc.manifest.to_dict()) == before  # no weights hash or files recorded on the caller's object
    bare = build_encoder(tiny_config(), seed=0)  # no manifest at all
    assert mimc.export(bare, tmp_path / "t").path.is_file() and getattr(bare, "manifest", None) is None


def test_graph_verbs_refuse_an_encoder_in_memory_with_a_mimc_error(tmp_path):
    import pytest

    from mimc.errors import BadInputError

    enc = mimc.load("ref")
    with pytest.raises(BadInputError, match=r"mimc.export\(encoder, DIR\)"):
        mimc.quantize(enc, "builtin", tmp_path / "q.int8.onnx")
    with pytest.raises(BadInputError, match=r"mimc.export\(encoder, DIR\)"):
        mimc.profile(enc, "cpu")
    assert not any(tmp_path.iterdir())


def test_an_unknown_option_of_a_verb_is_a_config_error_naming_the_valid_ones(tmp_path):
    import pytest

    from mimc.errors import ConfigError

    calls = [lambda: mimc.prune("ref", tmp_path / "p", ratoi=0.5), lambda: mimc.width("ref", tmp_path / "w", ratio=0.5),
             lambda: mimc.tokens("ref", tmp_path / "t", r=4, rr=2),
             lambda: mimc.quantize("ref", "builtin", tmp_path / "q.int8.onnx", methd="percentile")]
    for call in calls:  # as sparsify and distill already did, not a TypeError from the config class
        with pytest.raises(ConfigError, match=r"unknown option\(s\) .* valid options are"):
            call()
    assert not any(tmp_path.iterdir())
    assert mimc.prune("ref", tmp_path / "b", blocks=[0, 1]).encoder.config.depth == 10  # lists still taken


def test_evaluate_of_a_path_reports_json_serialisable_names(tmp_path):
    import json
    from pathlib import Path

    mimc.prune("ref", tmp_path / "a", ratio=0.5)
    body = mimc.evaluate(tmp_path / "a", Path("ref"), "builtin", n=16).to_dict()
    assert json.loads(json.dumps(body))["model"] == str(tmp_path / "a") and body["reference"] == "ref"


def test_search_of_an_encoder_names_it_model_not_its_repr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = mimc.SearchSpace(block_ratios=[0.0, 0.5], token_keeps=[1.0], precisions=["fp32"], runtimes=["ort"])
    report = mimc.search(mimc.load("ref"), "cpu", n=8, n_eval=8, iters=2, space=space)
    assert report["model"] == "model" and report["output"] == "model-search"
    assert [p.name for p in tmp_path.iterdir()] == ["model-search"]  # not a folder named after the module's repr
    assert yaml.safe_load((tmp_path / "model-search" / "recipe.yaml").read_text())["model"] == "model"


def test_search_space_may_be_a_mapping_and_anything_else_is_a_config_error(tmp_path):
    import pytest

    from mimc.errors import ConfigError

    space = {"block_ratios": [0.0, 0.5], "token_keeps": [1.0], "precisions": ["fp32"], "runtimes": ["ort"]}
    report = mimc.search("ref", "cpu", n=8, n_eval=8, iters=2, space=space, output=tmp_path / "s")
    assert sorted(c["blocks_removed"] for c in report["candidates"]) == [0.0, 0.5]
    with pytest.raises(ConfigError, match="unknown option"):
        mimc.search("ref", "cpu", n=8, n_eval=8, space={"blocks": [0.5]}, output=tmp_path / "t")
    with pytest.raises(ConfigError, match="space must be a SearchSpace"):
        mimc.search("ref", "cpu", n=8, n_eval=8, space=[0.5], output=tmp_path / "t")


def test_library_errors_name_options_not_cli_flags(tmp_path):
    import pytest

    from mimc.errors import BadInputError

    mimc.tokens("ref", tmp_path / "t", r=4)
    ov = mimc.build(mimc.export("ref", tmp_path / "e").path, "openvino-cpu", output=tmp_path / "ov.xml")["ir"]
    calls = {("macs", "round_to"): lambda: mimc.width("ref", tmp_path / "w", macs=0.01),
             ("macs",): lambda: mimc.width(tmp_path / "t", tmp_path / "w", macs=0.5),
             ("mask_ratio",): lambda: mimc.distill(tmp_path / "t", tmp_path / "d", data="builtin", n=8, steps=1, batch_size=4,
                                                   mask_ratio=0.5),
             ("device",): lambda: mimc.profile(ov, "cpu"),
             ("device", "predict"): lambda: mimc.profile(ov, "h100", predict=True)}
    for options, call in calls.items():
        with pytest.raises(BadInputError) as info:
            call()
        assert "--" not in str(info.value) and info.value.options == options, str(info.value)
        assert all(o in str(info.value) for o in options)  # so the CLI words each as its flag, a recipe as its key


def test_a_fractional_or_text_n_is_a_mimc_error_naming_n(tmp_path):
    import pytest

    from mimc.errors import BadInputError

    calls = [lambda: mimc.prune("ref", tmp_path / "p", ratio=0.5, criterion="sensitivity", data="builtin", n=3.5),
             lambda: mimc.embed("ref", "builtin", tmp_path / "f", n=3.5), lambda: mimc.inspect("ref", data="builtin", n=3.5),
             lambda: mimc.evaluate("ref", "ref", "builtin", n=3.5), lambda: mimc.evaluate("ref", "ref", "builtin", n="8")]
    for call in calls:  # not numpy's TypeError from deep inside the sampling
        with pytest.raises(BadInputError) as info:
            call()
        assert info.value.options == ("n",)
    assert not any(tmp_path.iterdir())


def test_run_takes_data_with_a_mapping_a_path_as_model_and_refuses_other_types(tmp_path):
    from mimc.errors import ConfigError

    art = mimc.prune("ref", tmp_path / "half", ratio=0.5).output
    recipe = {"model": art, "stages": [{"sparsify": {"pattern": "2:4", "method": "wanda", "n_calib": 8}}]}
    with pytest.raises(ConfigError, match="need images"):
        mimc.run(recipe, tmp_path / "a")  # no data in the mapping
    report = mimc.run(recipe, tmp_path / "b", data="builtin")  # data given to run, as with a YAML path
    assert report["recipe"]["data"] == "builtin" and report["recipe"]["model"] == str(art)
    with pytest.raises(ConfigError, match="a recipe is a YAML path, an artifact folder, a mapping or a Recipe, got list"):
        mimc.run([1, 2], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_run_refuses_data_that_names_nothing_for_a_mapping_or_a_recipe(tmp_path):
    # before: only a YAML path's replacement images were checked; with a mapping or a Recipe, data='nope/'
    # was silently ignored by a data-free run and written into its recipe.yaml
    from mimc.errors import DataError

    recipe = {"model": "ref", "stages": [{"prune": {"ratio": 0.5}}]}
    for given in (recipe, mimc.recipe(recipe)):
        with pytest.raises(DataError, match="data path nope/ does not exist") as info:
            mimc.run(given, tmp_path / "out", data="nope/")
        assert info.value.options == ("data",)
    assert not (tmp_path / "out").exists()


def test_a_verb_that_runs_in_one_process_is_refused_under_torchrun_before_any_work(tmp_path, monkeypatch):
    # prune printed "wrote X" on every rank; export and quantize ran whole on every rank, each writing into the artifact
    import mimc.models.resolve as resolve
    from mimc.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    calls = {"mimc prune": lambda: mimc.prune("ref", "out", ratio=0.5), "mimc width": lambda: mimc.width("ref", "out", mlp=0.5),
             "mimc tokens": lambda: mimc.tokens("ref", "out", r=4),
             "mimc sparsify --method magnitude": lambda: mimc.sparsify("ref", "out", method="magnitude"),
             "mimc export": lambda: mimc.export("ref", "out"), "mimc quantize": lambda: mimc.quantize("ref", "builtin"),
             "mimc build": lambda: mimc.build("out/model.onnx", "cpu"), "mimc profile": lambda: mimc.profile("m.onnx", "cpu"),
             "mimc inspect": lambda: mimc.inspect("ref", plot=True), "mimc search": lambda: mimc.search("ref", output="out"),
             "mimc profiles": lambda: mimc.profiles()}
    for command, call in calls.items():
        with pytest.raises(ConfigError, match=f"^{command} runs in one process and torchrun started 2: run {command} without "
                                              r"torchrun \(torchrun spreads only mimc sparsify --method learned, distill, embed and eval\)$"):
            call()
    assert not list(tmp_path.iterdir())


def test_verbs_leave_the_callers_torch_random_state_alone(tmp_path):
    # a service seeds its own sampling: reading images drew a DataLoader base seed from the global RNG
    import torch

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    mimc.embed("ref", "builtin", tmp_path / "f", n=8, workers=0)
    mimc.evaluate("ref", "ref", "builtin", n=8)
    mimc.prune("ref", tmp_path / "p", ratio=0.5, criterion="sensitivity", data="builtin", n=8)
    assert torch.equal(torch.get_rng_state(), before)


def test_building_an_encoder_leaves_the_callers_torch_random_state_alone(tmp_path):
    # random: models reseeded the global RNG to 0; loading an artifact, width and tokens built
    # modules whose default init drew from it (numbers overwritten at once)
    import torch

    art = mimc.prune("ref", tmp_path / "p", ratio=0.5).output
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    assert mimc.load("random:vit-ti/16").config.dim == 192
    mimc.load(art)
    mimc.width("ref", tmp_path / "w", mlp=0.5)
    mimc.tokens("ref", tmp_path / "t", r=4)
    mimc.quantize(art, "builtin", n=16, smooth=0.5)
    assert torch.equal(torch.get_rng_state(), before)


def test_inspect_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    # a notebook's inline backend was switched to Agg by matplotlib.use: its later plots showed nothing
    matplotlib = pytest.importorskip("matplotlib")

    matplotlib.use("svg")
    report = mimc.inspect("ref", plot=tmp_path / "b.png")
    assert matplotlib.get_backend() == "svg" and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert report["plot"] == str(tmp_path / "b.png")


def test_search_recipe_names_a_local_model_and_data_by_absolute_path(tmp_path, monkeypatch):
    # recipe.yaml said `model: a` and `data: imgs.npz`: `mimc run` of it from any other folder found neither
    import shutil

    from mimc.data.readers import BUILTIN_PATH

    monkeypatch.chdir(tmp_path)
    mimc.prune("ref", "a", ratio=0.5)
    shutil.copy(BUILTIN_PATH, "imgs.npz")
    space = {"block_ratios": [0.0], "token_keeps": [1.0], "precisions": ["fp32"], "runtimes": ["ort"]}
    report = mimc.search("a", "cpu", data="imgs.npz", n=8, n_eval=8, iters=2, space=space, output="s")
    recipe = yaml.safe_load((tmp_path / "s" / "recipe.yaml").read_text())
    assert (recipe["model"], recipe["data"]) == (str(tmp_path / "a"), str(tmp_path / "imgs.npz"))
    assert (report["model"], report["data"]) == ("a", "imgs.npz")  # the report names them as given


def test_a_text_or_fractional_count_is_a_mimc_error_naming_its_option(tmp_path):
    # a service passing threads=os.environ["THREADS"] got TypeError: '<' not supported between 'str' and 'int'
    import numpy as np

    from mimc.errors import MimcError

    graph = mimc.export("ref", tmp_path / "e").path
    f = tmp_path / "f"
    calls = {"threads": [lambda: mimc.embed("ref", "builtin", f, n=8, threads="2"), lambda: mimc.profile(graph, "cpu", threads=2.0),
                         lambda: mimc.evaluate("ref", "ref", "builtin", n=8, threads="2")],
             "batch_size": [lambda: mimc.embed("ref", "builtin", f, n=8, batch_size="4"), lambda: mimc.inspect("ref", batch_size=4.0),
                            lambda: mimc.evaluate("ref", "ref", "builtin", n=8, batch_size="4"),
                            lambda: mimc.prune("ref", tmp_path / "p", ratio=0.5, batch_size="4")],
             "workers": [lambda: mimc.embed("ref", "builtin", f, n=8, workers="1")],
             "seed": [lambda: mimc.embed("ref", "builtin", f, n=8, seed="1")],
             "iters": [lambda: mimc.profile(graph, "cpu", iters="3")], "hist_bins": [lambda: mimc.inspect("ref", hist_bins="64")],
             "checkpoint_every": [lambda: mimc.sparsify("ref", tmp_path / "s", method="learned", data="builtin",
                                                        checkpoint_every="1")]}
    for option, refused in calls.items():
        for call in refused:
            with pytest.raises(MimcError) as info:
                call()
            assert option in info.value.options and "--" not in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    report = mimc.embed("ref", "builtin", f, n=8, batch_size=np.int64(4), threads=np.int64(1), workers=np.int64(0))
    assert report.images == 8  # numpy whole numbers are whole numbers


def test_embed_and_inspect_take_numpy_whole_numbers_for_n_and_seed(tmp_path):
    # n=np.int64(8) embedded every image, then failed writing its index: int64 is not JSON serializable
    import numpy as np

    mimc.embed("ref", "builtin", tmp_path / "f", n=np.int64(8), seed=np.int64(1), workers=0)
    index = json_load(tmp_path / "f.json")
    assert (index["n"], index["seed"], len(index["rows"])) == (8, 1, 8)
    assert mimc.inspect("ref", data="builtin", n=np.int64(8), seed=np.int64(1))["data"] == "builtin"  # seed: torch's TypeError
    for refused, option in ((lambda: mimc.embed("ref", "builtin", tmp_path / "g", n="8"), "n"),
                            (lambda: mimc.inspect("ref", seed="1"), "seed")):
        with pytest.raises(mimc.api.ConfigError) as info:
            refused()
        assert info.value.options == (option,)


def test_a_model_that_is_neither_an_encoder_nor_a_model_argument_is_refused(tmp_path):
    # mimc.prune(None, ...) raised AttributeError: 'NoneType' object has no attribute 'config'
    from mimc.errors import NotAModelError

    calls = [lambda: mimc.prune(None, tmp_path / "p", ratio=0.5), lambda: mimc.width(5, tmp_path / "w", mlp=0.5),
             lambda: mimc.export(5, tmp_path / "e"), lambda: mimc.inspect(object()),
             lambda: mimc.distill("ref", tmp_path / "d", data="builtin", teacher=5)]
    for call in calls:
        with pytest.raises(NotAModelError, match="cannot use a (NoneType|int|object) as a model: pass an Encoder or a MODEL"):
            call()
    assert not any(tmp_path.iterdir())


def test_every_public_name_of_the_package_is_listed_by_dir_and_all():
    # mimc.SearchSpace and mimc.ImageSource resolved, but dir() (a notebook's completion) and __all__ left them out
    for name in ("SearchSpace", "ImageSource", "prune", "load"):
        assert name in dir(mimc) and name in mimc.__all__ and getattr(mimc, name) is not None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_writing_an_artifact_never_sets_the_process_umask(tmp_path, monkeypatch):
    # the umask was read by setting it to 0 and back: a service thread creating a file meanwhile made it world-writable
    import os

    umask, set_to = os.umask(0o027), []
    try:
        monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or pytest.fail("umask set"))
        out = mimc.prune("ref", tmp_path / "p", ratio=0.5).output
    finally:
        monkeypatch.undo()
        os.umask(umask)
    assert set_to == [] and (out / "mimc.json").stat().st_mode & 0o777 == 0o640 and out.stat().st_mode & 0o777 == 0o750


def test_a_predicted_profile_never_changes_the_working_directory(tmp_path, monkeypatch):
    # counting FLOPs ran ORT's shape inference after os.chdir into a temp folder: a service thread writing
    # a relative path meanwhile wrote into that folder, deleted right after
    import os

    graph = mimc.export("ref", tmp_path / "e").path
    monkeypatch.setattr(os, "chdir", lambda path: pytest.fail(f"chdir {path}"))
    report = mimc.profile(graph, "h100", predict=True)
    assert report["label"] == "predicted" and not (tmp_path / "sym_shape_infer_temp.onnx").exists()


def test_quantize_refuses_options_beside_a_config_and_a_config_of_another_type(tmp_path):
    # config=QuantizeConfig(...) with device='openvino-cpu' or method='minmax' beside it ignored them silently;
    # a mapping as config raised AttributeError: 'dict' object has no attribute 'precision'
    from mimc.errors import ConfigError
    from mimc.quant.config import QuantizeConfig

    config = QuantizeConfig(n=16)
    calls = {("config", "device"): lambda: mimc.quantize("ref", "builtin", tmp_path / "q.int8.onnx", config=config, device="openvino-cpu"),
             ("config", "method"): lambda: mimc.quantize("ref", "builtin", tmp_path / "q.int8.onnx", config=config, method="minmax"),
             ("config",): lambda: mimc.quantize("ref", "builtin", tmp_path / "q.int8.onnx", config={"n": 16})}
    for options, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.options == options and all(o in str(info.value) for o in options), str(info.value)
    assert not any(tmp_path.iterdir())
