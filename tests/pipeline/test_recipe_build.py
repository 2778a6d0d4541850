"""A recipe's ``build`` stage: the OpenVINO IR is the deployable, written and recorded in the artifact,
and the profile / eval stages after it run the IR itself (eval's fidelity measured through OpenVINO)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from mimc.artifact import read_manifest, sha256_file
from mimc.errors import ConfigError, MissingExtraError
from mimc.pipeline.recipe import load_recipe, parse_recipe
from mimc.pipeline.recipe_run import run_recipe
from mimc.pipeline.stages import BuildConfig
from tests.cli.conftest import invoke, one_error_line

FAST = {"warmup": 1, "iters": 2}


def needs_openvino():
    return pytest.importorskip("openvino")


def recipe(*stages, **extra):
    return {"model": "ref", "data": "builtin", "n": 32, "stages": list(stages), **extra}


def test_export_build_profile_eval_runs_the_ir_on_openvino(tmp_path):
    needs_openvino()
    out = tmp_path / "out"
    report = run_recipe(parse_recipe(recipe(
        "export", {"build": {"device": "openvino-cpu"}}, {"profile": {"device": "openvino-cpu", **FAST}},
        {"eval": {"graph": "model.onnx", "n": 32}}, {"eval": {"n": 32}})), out)
    assert {"model.xml", "model.bin", "model.xml.json", "model.onnx", "recipe.yaml", "run.json"} <= {p.name for p in out.iterdir()}
    build, profile, eval_onnx, eval_ir = report["stages"][1:]
    assert build["stage"] == "build" and build["file"] == "model.xml" and build["precision"] == "fp32" and build["source"] == "model.onnx"
    # the manifest records the IR like a graph: its sha256, its weights file (.bin) checked like external data
    entry = read_manifest(out).files["model.xml"]
    assert entry["kind"] == "openvino-ir" and entry["sha256"] == sha256_file(out / "model.xml")
    assert entry["external_data"] == "model.bin" and entry["external_data_sha256"] == sha256_file(out / "model.bin")
    assert entry["source"] == "model.onnx" and entry["source_sha256"] == read_manifest(out).files["model.onnx"]["sha256"]
    assert entry["precision"] == "fp32" and entry["stage"]["name"] == "build" and entry["stage"]["config"]["device"] == "openvino-cpu"
    sidecar = json.loads((out / "model.xml.json").read_text())
    assert sidecar["format"] == "openvino-ir" and sidecar["source"] == "model.onnx"  # not the run's temporary folder
    assert sidecar["runtime_precision"]["inference_precision_hint"] == "f32"
    # profile measured the IR on OpenVINO at its recorded precision, next to the dense source
    result = profile["result"]
    assert profile["file"] == "model.xml" and result["label"] == "measured" and result["backend"] == "openvino-cpu"
    assert result["precision"] == "fp32" and result["results"][0]["p50_ms"] > 0 and profile["speedup_vs_dense"] > 0
    inter = profile["interleaved_ms"]  # the ratio comes from the IR and the dense graph timed together on OpenVINO
    assert profile["speedup_vs_dense"] == round(inter["dense"] / inter["graph"], 3)
    # eval ran the IR through OpenVINO, the .onnx through ONNX Runtime: the same fp32 math
    assert eval_ir["file"] == "model.xml" and eval_ir["runtime"] == "openvino-cpu"
    assert eval_onnx["file"] == "model.onnx" and eval_onnx["runtime"] == "onnxruntime-cpu"
    assert abs(eval_ir["fidelity"]["pooled_cosine_mean"] - eval_onnx["fidelity"]["pooled_cosine_mean"]) < 1e-4
    assert eval_ir["fidelity"]["pooled_cosine_mean"] > 0.9999
    assert [s.name for s in load_recipe(out).steps] == ["export", "build", "profile", "eval", "eval"]  # replayable
    # an IR altered after the run is refused like a swapped graph
    from mimc.runtime.onnx_model import OnnxModel

    (out / "model.bin").write_bytes((out / "model.bin").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(Exception, match="external_data_sha256"):
        OnnxModel(out / "model.xml")


def test_a_plain_qdq_graph_builds_an_int8_ir_that_profile_and_eval_run(tmp_path):
    needs_openvino()
    from mimc.runtime.openvino import ir_precision

    out = tmp_path / "q"
    report = run_recipe(parse_recipe(recipe(
        {"quantize": {"n": 16, "target": "openvino"}}, {"build": {"device": "openvino-cpu", "precision": "int8"}},
        {"profile": {"device": "openvino-cpu", "baseline": False, **FAST}}, {"eval": {"n": 32}})), out)
    build, profile, eval_ = report["stages"][1:]
    assert build["file"] == "model.xml" and build["source"] == "model.int8.onnx" and build["precision"] == "int8"
    assert ir_precision(out / "model.xml") == "int8"  # the IR says which precision it was built at
    assert read_manifest(out).files["model.xml"]["source"] == "model.int8.onnx"
    assert profile["file"] == "model.xml" and profile["result"]["precision"] == "int8"
    assert eval_["runtime"] == "openvino-cpu" and eval_["fidelity"]["pooled_cosine_mean"] > 0.98
    # without precision the build takes the graph's own: int8 for a quantized graph
    assert parse_recipe(recipe({"quantize": {"fuse_attention": False}}, "build")).steps[1].config.precision is None


@pytest.mark.parametrize("stages, match", [
    (["export", {"build": {"device": "tpu-v9"}}], "stages[1].build.device 'tpu-v9'"),
    (["export", {"build": {"device": "cpu"}}], "nothing to build"),
    (["export", {"build": {"precision": "fp16"}}], "stages[1].build.precision: device 'openvino-cpu' has no fp16"),
    ([{"build": {}}], "stages[0].build builds the last graph, and no earlier stage writes one"),
    (["export", {"build": {"graph": "model.int8.onnx"}}], "stages[1].build reads graph 'model.int8.onnx'"),
    (["export", {"build": {"precision": "int8"}}], "stages[1].build.precision int8 needs a quantized graph"),
    (["export", {"build": {"precision": "int8-bf16"}}], "stages[1].build.precision int8-bf16 needs a quantized graph"),
    (["export", {"quantize": {"target": "openvino"}}, {"build": {"precision": "fp32"}}], "would still run its Q/DQ layers in int8"),
    (["export", {"quantize": {}}, "build"], "fuse_attention: false"),  # QAttention: an ONNX Runtime kernel
    (["export", {"quantize": {"fuse_attention": False}}, {"build": {"device": "h100"}}], "a CPU graph, for h100"),
    (["export", {"quantize": {"target": "openvino"}}, {"build": {"device": "h100"}}], "a CPU graph, for h100"),
    (["export", "build", {"profile": {"device": "cpu"}}], "stages[2].profile would time model.xml, an OpenVINO IR, on cpu"),
    (["export", "build", {"profile": {"device": "openvino-cpu", "predict": True}}], "stages[2].profile.predict"),
    (["export", "build", "build"], "stage 'build' appears 2 times"),
    (["build", "export"], "export comes after build"),
    (["export", "build", {"quantize": {}}], "quantize comes after build"),
])
def test_bad_build_stages_are_refused_before_any_work(stages, match):
    with pytest.raises(ConfigError) as info:
        parse_recipe(recipe(*stages))
    assert match in str(info.value) and "\n" not in str(info.value)


def test_build_options_are_declared_like_every_stages():
    schema = BuildConfig.json_schema()
    assert schema["title"] == "build" and set(schema["properties"]) == {"device", "precision", "graph"}
    assert schema["properties"]["device"]["default"] == "openvino-cpu" and None in schema["properties"]["precision"]["enum"]
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        BuildConfig(precision="int4")


def test_bf16_on_a_cpu_without_it_exits_2_with_one_line_and_writes_nothing(tmp_path):
    needs_openvino()
    from mimc.cli.app import app
    from mimc.runtime.openvino import cpu_bf16

    if cpu_bf16()["supported"]:
        pytest.skip("this CPU runs bf16")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("export", {"build": {"precision": "bf16"}}, "eval")))
    result = invoke(app, ["run", path, "-o", tmp_path / "out"])
    one_error_line(result, "stages[1].build.precision bf16 needs a CPU with AVX-512 BF16 or AMX")
    assert not (tmp_path / "out").exists()


def test_a_tensorrt_build_goes_through_the_tensorrt_path(tmp_path):
    from mimc.cli.app import app

    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the build would run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("export", {"build": {"device": "h100"}})))
    result = invoke(app, ["run", path, "-o", tmp_path / "out"])
    one_error_line(result, "stages[1].build: ")  # TensorRT's own install hint, before any stage ran
    assert "tensorrt" in result.stderr.lower() and not (tmp_path / "out").exists()


def test_without_openvino_a_build_is_refused_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails
    with pytest.raises(MissingExtraError, match=r"stages\[1\]\.build: OpenVINO is not installed: pip install 'mimc\[openvino\]'"):
        run_recipe(parse_recipe(recipe("export", "build")), tmp_path / "out")
    assert not (tmp_path / "out").exists()



def test_an_ir_replayed_in_the_same_process_is_identical(tmp_path):
    # OpenVINO names the nodes it makes (Constant_39) from a counter of the process: a second build of
    # the same graph in one process (mimc.run of an artifact from Python) wrote another model.xml,
    # and the replay said it differed
    needs_openvino()
    import mimc

    run_recipe(parse_recipe(recipe("export", "build")), tmp_path / "art")
    assert mimc.run(str(tmp_path / "art"), tmp_path / "again")["replay"]["differ"] == []


def test_a_replay_whose_ir_weights_differ_does_not_call_the_ir_identical(tmp_path):
    # the IR's model.xml holds the graph, its model.bin the weights: the replay compared only the
    # .xml, so an IR rebuilt with other weights (Wanda on other images) was listed as identical
    needs_openvino()
    import numpy as np

    import mimc

    art = tmp_path / "art"
    run_recipe(parse_recipe(recipe({"sparsify": {"method": "wanda", "n_calib": 8}}, "export", "build", n=8)), art)
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    replay = mimc.run(str(art), tmp_path / "again", data=str(other))["replay"]
    assert sha256_file(art / "model.bin") != sha256_file(tmp_path / "again" / "model.bin")
    assert "model.xml" in replay["differ"] and "model.xml" not in replay["identical"]
