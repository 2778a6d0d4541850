"""OpenVINO as a CPU runtime: sessions match ORT, the f32 hint is honoured and reported, build writes an IR
+ sidecar that eval reads, profile measures on it, and a missing extra exits 2 with one line."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mimc.artifact import save_artifact
from mimc.models.vit import build_encoder
from tests.cli.conftest import invoke, one_error_line
from tests.conftest import tiny_config


@pytest.fixture
def app():
    from mimc.cli.app import app

    return app


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from mimc.api import export

    folder = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path_factory.mktemp("ov") / "art")
    return export(str(folder), validate=False).path


def test_session_matches_onnx_runtime_in_f32_and_reports_the_precision(graph):
    pytest.importorskip("openvino")
    from mimc.runtime.openvino import OpenVinoSession, runtime_precision
    from mimc.runtime.session import run_onnx

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ov_session = OpenVinoSession(graph, "fp32", threads=1)
    got, want = run_onnx(ov_session, x), run_onnx(graph, x, threads=1)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0)
    used = runtime_precision(ov_session.compiled)
    assert used["inference_precision_hint"] == "f32"  # asked for explicitly: never OpenVINO's bf16 default
    assert set(used["compute_layers"]) == {"f32"} and sum(used["compute_layers"].values()) > 0


def test_bf16_follows_the_cpu(graph):
    pytest.importorskip("openvino")
    from mimc.errors import DeviceUnavailableError
    from mimc.runtime.openvino import check_precision, cpu_bf16

    if cpu_bf16()["supported"]:
        assert check_precision("bf16") == "bf16"
    else:
        with pytest.raises(DeviceUnavailableError, match="AVX-512 BF16 or AMX") as exc:
            check_precision("bf16")
        assert exc.value.options == ("precision",)


def test_build_writes_an_ir_and_sidecar_that_eval_and_profile_read(app, graph):
    pytest.importorskip("openvino")
    result = invoke(app, ["build", graph, "--device", "openvino-cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ir = graph.parent / "openvino-cpu-fp32.xml"
    assert report["ir"] == str(ir) and ir.is_file() and ir.with_suffix(".bin").is_file()
    side = json.loads((graph.parent / "openvino-cpu-fp32.xml.json").read_text())
    assert side["precision"] == "fp32" and side["runtime_precision"]["inference_precision_hint"] == "f32"
    assert side["openvino_version"] and side["inputs"]["pixel_values"]["shape"] == [1, 3, 32, 32] and side["build_seconds"] >= 0

    result = invoke(app, ["eval", ir, "--ref", graph, "--n", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fidelity"]["pooled_cosine_mean"] > 0.99999

    result = invoke(app, ["profile", ir, "--device", "openvino-cpu", "--iters", "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    prof = json.loads(result.stdout)
    assert prof["label"] == "measured" and prof["backend"] == "openvino-cpu" and prof["results"][0]["p50_ms"] > 0
    assert prof["runtime_precision"]["inference_precision_hint"] == "f32"
    one_error_line(invoke(app, ["profile", ir, "--device", "cpu"]), "openvino-cpu")


def test_profile_an_onnx_graph_on_openvino(app, graph):
    pytest.importorskip("openvino")
    result = invoke(app, ["profile", graph, "--device", "openvino-cpu", "--iters", "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    prof = json.loads(result.stdout)
    assert prof["label"] == "measured" and prof["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"


def test_missing_extra_exits_2_with_one_line(app, graph, monkeypatch):
    import mimc.runtime.openvino as mov

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    monkeypatch.setattr(mov, "_CORE", None)
    for args in (["profile", graph, "--device", "openvino-cpu"], ["build", graph, "--device", "openvino-cpu"]):
        one_error_line(invoke(app, args), "pip install 'mimc[openvino]'")


def test_int8_bf16_needs_bf16_and_an_int8_graph(graph, tmp_path):
    """int8-bf16: the Q/DQ graph with its float layers in bf16 - refused without bf16, and an IR's
    precision must be what its graph runs (no int8 IR of an fp32 graph, no fp32 IR of an int8 one)."""
    pytest.importorskip("openvino")
    from mimc.deploy.openvino import build_ir
    from mimc.errors import BadInputError, DeviceUnavailableError
    from mimc.latency.devices import load_profile
    from mimc.runtime.openvino import GRAPH_PRECISION, check_precision, cpu_bf16

    assert GRAPH_PRECISION["int8-bf16"] == "int8" and GRAPH_PRECISION["bf16"] == "fp32"
    if cpu_bf16()["supported"]:
        assert check_precision("int8-bf16") == "bf16"
    else:
        with pytest.raises(DeviceUnavailableError, match="precision int8-bf16 needs a CPU with AVX-512 BF16 or AMX.*use precision int8"):
            check_precision("int8-bf16")
    prof = load_profile("openvino-cpu")
    for precision in ("int8", "int8-bf16"):
        with pytest.raises(BadInputError, match=f"precision {precision} does not fit model.onnx, a fp32 graph: use fp32 or bf16"):
            build_ir(graph, prof, tmp_path / "m.xml", precision=precision)
    assert list(tmp_path.iterdir()) == []


def test_a_profile_names_the_precision_its_graph_runs(graph, tmp_path):
    """A quantized .onnx profiles as int8 unless told int8-bf16; fp32 for it is refused; an IR without
    mimc's record (built elsewhere) is read as quantized from its FakeQuantize ops."""
    pytest.importorskip("openvino")
    from mimc.errors import BadInputError
    from mimc.latency.openvino_cpu import precision_for
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.runtime.openvino import read, save_ir

    x = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)
    q = tmp_path / "model.int8.onnx"
    quantize_onnx(graph, q, [x[:16]], QuantizeConfig(target="openvino", overflow_fix="all"), [x[16:]], force=True)
    assert precision_for(graph) == "fp32" and precision_for(q) == "int8" and precision_for(q, "int8-bf16") == "int8-bf16"
    with pytest.raises(BadInputError, match="precision fp32 does not fit model.int8.onnx, an int8 graph: use int8 or int8-bf16"):
        precision_for(q, "fp32")
    save_ir(read(q), tmp_path / "plain.xml")  # no mimc precision record
    assert precision_for(tmp_path / "plain.xml") == "int8"
    from mimc.latency.run import profile

    report = profile(q, device="openvino-cpu", batch_sizes=[1], warmup=1, iters=2, threads=1)
    assert report["precision"] == "int8" and "f32" not in report["runtime_precision"]["compute_layers"]


def test_an_onnx_runtime_qattention_graph_is_refused_with_the_fix(app, graph, tmp_path):
    """mimc quantize's default cpu graph fuses attention into ONNX Runtime's QAttention, which OpenVINO
    cannot read: build / profile for openvino-cpu say so and name the quantization that fits, rather
    than OpenVINO's bare read error and a `mimc export` hint that does not help."""
    pytest.importorskip("openvino")
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx

    x = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)
    q = tmp_path / "model.int8.onnx"
    quantize_onnx(graph, q, [x[:16]], QuantizeConfig(), [x[16:]], force=True)
    for args in (["build", str(q), "--device", "openvino-cpu"], ["profile", str(q), "--device", "openvino-cpu"]):
        one_error_line(invoke(app, args), "QAttention), which OpenVINO cannot read: quantize it with --device openvino-cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_build_help_names_the_openvino_ir(app):
    """`mimc build --help` said "Build a TensorRT engine" and "A TensorRT device profile" only."""
    text = " ".join(invoke(app, ["build", "--help"]).stdout.split())
    assert "or an OpenVINO IR" in text and "or openvino-cpu" in text


def test_build_writes_its_ir_atomically_never_through_a_link_onto_the_graph(app, graph, tmp_path):
    """`mimc build g.onnx -d openvino-cpu -o link.xml` with link.xml (or link.bin) a symlink to the graph
    wrote the IR through the link over the graph; an output folder that did not exist was created."""
    pytest.importorskip("openvino")
    import hashlib
    import shutil

    g = tmp_path / "g.onnx"
    shutil.copy(graph, g)
    digest = hashlib.sha256(g.read_bytes()).hexdigest()
    for link in ("a.xml", "b.bin"):
        (tmp_path / link).symlink_to(g.name)
    for out in ("a.xml", "b.xml"):
        assert invoke(app, ["build", g, "--device", "openvino-cpu", "-o", tmp_path / out, "--overwrite"]).exit_code == 0
        assert hashlib.sha256(g.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "a.xml").is_symlink() and not (tmp_path / "b.bin").is_symlink()
    one_error_line(invoke(app, ["build", g, "--device", "openvino-cpu", "-o", tmp_path / "no" / "x.xml"]), "does not exist")
    assert not (tmp_path / "no").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_build_for_openvino_refuses_the_tensorrt_only_options(app, graph, tmp_path):
    """--batch, --workspace-gb, --timing-cache and --sparse set TensorRT's builder: for openvino-cpu they
    were silently ignored (an IR built, exit 0) instead of refused."""
    pytest.importorskip("openvino")
    # --workspace-gb 4 (its default's value, typed) was still ignored without a word
    for extra, flag in ((["--batch", "1:2:4"], "--batch"), (["--workspace-gb", "8"], "--workspace-gb"), (["--workspace-gb", "4"], "--workspace-gb"),
                        (["--timing-cache", str(tmp_path / "tc")], "--timing-cache"), (["--no-sparse"], "--sparse")):
        out = tmp_path / "ir.xml"
        one_error_line(invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", out, *extra]), flag)
        assert not out.exists() and not (tmp_path / "tc").exists()


def test_build_into_an_artifact_records_the_ir_so_a_new_export_sees_it(app, tmp_path):
    """`mimc build ART/model.onnx -d openvino-cpu` left its IR out of ART/mimc.json: a later export replaced
    model.onnx silently (the IR out of date), and an altered IR was not refused, unlike a recipe's build."""
    pytest.importorskip("openvino")
    from mimc.api import export

    graph = export(str(save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")), validate=False).path
    assert invoke(app, ["build", graph, "--device", "openvino-cpu"]).exit_code == 0
    entry = json.loads((graph.parent / "mimc.json").read_text())["files"]["openvino-cpu-fp32.xml"]
    assert entry["source"] == "model.onnx" and entry["external_data"] == "openvino-cpu-fp32.bin"
    one_error_line(invoke(app, ["export", graph.parent]), "openvino-cpu-fp32.xml")
    assert invoke(app, ["export", graph.parent, "--overwrite"]).exit_code == 0
    assert not (graph.parent / "openvino-cpu-fp32.xml").exists() and not (graph.parent / "openvino-cpu-fp32.bin").exists()


def test_build_onto_an_existing_file_outside_an_artifact_needs_overwrite(app, graph, tmp_path):
    """-o ir.xml over a file of the user's replaced it silently, where embed, export, quantize and prune refuse."""
    pytest.importorskip("openvino")
    taken = tmp_path / "ir.xml"
    taken.write_text("mine")
    args = ["build", graph, "--device", "openvino-cpu", "-o", taken]
    one_error_line(invoke(app, args), "ir.xml already exists")
    assert taken.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["ir.xml"]
    assert invoke(app, [*args, "--overwrite"]).exit_code == 0 and taken.read_text().startswith("<?xml")


def test_build_onto_a_folder_is_refused_and_writes_nothing(app, graph, tmp_path):
    """-o x.xml naming a folder was an IsADirectoryError traceback, with x.bin already written."""
    pytest.importorskip("openvino")
    (tmp_path / "x.xml").mkdir()
    one_error_line(invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", tmp_path / "x.xml"]), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.xml"]


def test_an_fp8_graph_is_refused_for_openvino_not_labelled_fp32(app, graph, tmp_path):
    """build / profile --device openvino-cpu of a model.fp8.onnx went through and reported precision fp32,
    a precision that graph does not run (quantize refuses fp8 for OpenVINO: it has no FP8 kernels)."""
    pytest.importorskip("openvino")
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx

    x = [np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)]
    q = tmp_path / "model.fp8.onnx"
    quantize_onnx(graph, q, x, QuantizeConfig(precision="fp8"), x, force=True)
    for args in (["build", q, "--device", "openvino-cpu"], ["profile", q, "--device", "openvino-cpu"]):
        one_error_line(invoke(app, args), "fp8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp8.onnx"]


def test_an_ir_built_outside_its_artifact_finds_it_from_any_folder(app, graph, tmp_path, monkeypatch):
    # before: the sidecar named the graph as typed (relative) and only engines followed their sidecar,
    # so eval / embed of `mimc build ART/model.onnx -o elsewhere/m.xml` said it "was not written by mimc"
    pytest.importorskip("openvino")
    monkeypatch.chdir(graph.parent.parent)
    (tmp_path / "deploy").mkdir()
    built = invoke(app, ["build", f"{graph.parent.name}/{graph.name}", "--device", "openvino-cpu", "-o", tmp_path / "deploy" / "m.xml"])
    assert built.exit_code == 0, built.output
    assert json.loads((tmp_path / "deploy" / "m.xml.json").read_text())["source"] == str(graph.resolve())
    monkeypatch.chdir(tmp_path)
    result = invoke(app, ["eval", "deploy/m.xml", "--ref", graph.parent, "--data", "builtin", "--n", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runtime"] == "openvino-cpu" and report["fidelity"]["pooled_cosine_mean"] > 0.99


def test_build_into_another_artifact_is_refused_and_writes_nothing(app, graph, tmp_path):
    """`mimc build A/model.onnx -d openvino-cpu -o B/x.xml` wrote an IR into artifact B, whose mimc.json does not
    list it: every later command refused it as a file "its mimc.json does not list" (quantize refuses the same)."""
    pytest.importorskip("openvino")
    from tests.cli.conftest import snapshot

    other = save_artifact(build_encoder(tiny_config(), seed=1), tmp_path / "other")
    before = snapshot(other)
    one_error_line(invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", other / "x.xml"]), "inside the artifact")
    assert snapshot(other) == before


def test_a_damaged_ir_is_refused_with_what_openvino_found_and_the_rebuild(app, graph, tmp_path):
    """A truncated (or another model's) .bin said "OpenVINO cannot read m.xml (Exception from
    src/inference/src/cpp/core.cpp:84:): re-export it with `mimc export`": the line OpenVINO's error starts
    with names its source file, not the problem, and an IR is rebuilt, not re-exported."""
    pytest.importorskip("openvino")
    ir = tmp_path / "m.xml"
    assert invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", ir]).exit_code == 0
    ir.with_suffix(".bin").write_bytes(ir.with_suffix(".bin").read_bytes()[:1000])
    for args in (["profile", ir, "--device", "openvino-cpu"], ["eval", ir, "--ref", graph, "--n", "2"]):
        result = invoke(app, args)
        one_error_line(result, "Incorrect weights in bin file")
        assert "core.cpp" not in result.stderr and "mimc build" in result.stderr


def test_an_xml_that_is_not_an_ir_is_refused_in_one_line(tmp_path):
    """`mimc profile a.xml --device openvino-cpu` on an XML file that is not an IR: OpenVINO tried its other
    readers, TensorFlow's among them, which wrote "WARNING: All log messages before absl::InitializeLog()..."
    and two "Error parsing text-format tensorflow.GraphDef" lines to stderr before mimc's error line."""
    pytest.importorskip("openvino")
    import os
    import subprocess
    from pathlib import Path

    (tmp_path / "a.xml").write_text('<?xml version="1.0"?>\n<config><x>1</x></config>\n')
    (tmp_path / "a.bin").write_bytes(b"\0" * 16)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-m", "mimc", "profile", "a.xml", "--device", "openvino-cpu"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "not an OpenVINO IR" in lines[0], run.stderr


def test_an_altered_ir_in_an_artifact_names_the_build_that_remakes_it(app, tmp_path):
    """An artifact's IR whose .bin changed was refused with "re-export it (mimc export ART)": an export does not
    make the IR again (and, with the IR made from model.onnx, is itself refused without --overwrite)."""
    pytest.importorskip("openvino")
    import shlex

    from mimc.api import export

    graph = export(str(save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "art")), validate=False).path
    assert invoke(app, ["build", graph, "--device", "openvino-cpu"]).exit_code == 0
    ir = graph.parent / "openvino-cpu-fp32.xml"
    ir.with_suffix(".bin").write_bytes(ir.with_suffix(".bin").read_bytes()[:-4] + b"\0\0\0\1")
    result = invoke(app, ["profile", ir, "--device", "openvino-cpu", "--iters", "1", "--warmup", "0"])
    one_error_line(result, "rebuild it (mimc build")
    fix = result.stderr.split("rebuild it (mimc ")[1].split(")")[0]
    assert invoke(app, shlex.split(fix)).exit_code == 0
    assert invoke(app, ["profile", ir, "--device", "openvino-cpu", "--iters", "1", "--warmup", "0"]).exit_code == 0


def test_build_for_a_device_that_runs_onnx_itself_names_openvino_too(app, graph, tmp_path):
    """`mimc build g.onnx --device cpu` said "`mimc build` makes TensorRT engines: pick a TensorRT device", though
    it builds OpenVINO IRs for openvino-cpu as well."""
    one_error_line(invoke(app, ["build", graph, "--device", "cpu", "-o", tmp_path / "x.xml"]), "openvino-cpu")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_openvino_precision_reads_as_one_sentence(app, graph, tmp_path):
    """The refusal of --precision fp16 read "--precision fp16 is not an OpenVINO CPU --precision: ..." (the CLI
    words every mention of the option as its flag)."""
    pytest.importorskip("openvino")
    result = invoke(app, ["build", graph, "--device", "openvino-cpu", "--precision", "fp16", "-o", tmp_path / "x.xml"])
    one_error_line(result, "--precision fp16")
    assert result.stderr.count("--precision") == 1 and list(tmp_path.iterdir()) == []


def test_a_profile_report_never_replaces_the_irs_sidecar(app, graph, tmp_path):
    """`mimc profile m.xml -d openvino-cpu -o m.xml.json` wrote the report over the IR's sidecar, which names the
    graph it was built from: eval and embed of the IR then said it "was not written by mimc"."""
    pytest.importorskip("openvino")
    ir = tmp_path / "m.xml"
    assert invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", ir]).exit_code == 0
    before = (tmp_path / "m.xml.json").read_bytes()
    one_error_line(invoke(app, ["profile", ir, "--device", "openvino-cpu", "--iters", "1", "-o", tmp_path / "m.xml.json"]),
                   "m.xml.json")
    assert (tmp_path / "m.xml.json").read_bytes() == before


def test_build_onto_a_full_disk_is_one_line_and_leaves_nothing(app, graph, tmp_path, monkeypatch):
    """OpenVINO reports a disk that fills under its IR as a bare RuntimeError of its C++ stream: a traceback."""
    ov = pytest.importorskip("openvino")

    def full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", full)
    one_error_line(invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", tmp_path / "m.xml"]), "cannot write", code=1)
    assert list(tmp_path.iterdir()) == []


def test_build_never_writes_over_the_graph_or_its_external_weights(app, graph, tmp_path):
    """`mimc build g.onnx -d openvino-cpu -o w.xml` with the graph's weights in w.bin (external data) replaced them
    with the IR's weights: the graph was broken. `-d h100 -o g.onnx` (an engine onto the graph) was not refused
    before TensorRT was needed."""
    pytest.importorskip("openvino")
    import onnx

    from tests.cli.conftest import snapshot

    onnx.save(onnx.load(graph), tmp_path / "g.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    before = snapshot(tmp_path)
    one_error_line(invoke(app, ["build", tmp_path / "g.onnx", "--device", "openvino-cpu", "-o", tmp_path / "w.xml"]), "w.bin")
    one_error_line(invoke(app, ["build", tmp_path / "g.onnx", "--device", "h100", "-o", tmp_path / "g.onnx"]), "is the input")
    assert snapshot(tmp_path) == before


def test_build_with_a_folder_where_its_sidecar_goes_writes_nothing(app, graph, tmp_path):
    """-o x.xml with a folder named x.xml.json (or x.bin) was refused only once the IR was in place: x.xml and
    x.bin were left behind without a sidecar."""
    pytest.importorskip("openvino")
    for name in ("x.xml.json", "x.bin"):
        folder = tmp_path / name
        folder.mkdir()
        one_error_line(invoke(app, ["build", graph, "--device", "openvino-cpu", "-o", tmp_path / "x.xml"]), "is a directory")
        assert [p.name for p in tmp_path.iterdir()] == [name]
        folder.rmdir()


def test_profile_help_and_refusals_name_the_openvino_ir(app, tmp_path):
    """`mimc profile --help` said its MODEL is "An .onnx graph ... or a TensorRT .plan", and a missing or folder MODEL
    was answered with the same two kinds, though profile measures an OpenVINO .xml IR too."""
    assert "OpenVINO .xml IR" in " ".join(invoke(app, ["profile", "--help"]).stdout.split())
    one_error_line(invoke(app, ["profile", tmp_path / "missing.xml", "--device", "openvino-cpu"]), "OpenVINO .xml IR")
    one_error_line(invoke(app, ["profile", tmp_path, "--device", "openvino-cpu"]), "OpenVINO .xml IR")
