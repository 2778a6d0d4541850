"""TensorRT building and profiling: pure settings on CPU, the API calls against a small fake `tensorrt`."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, MissingExtraError
from mimc.deploy.onnx import export_onnx
from mimc.deploy.tensorrt import build_engine, builder_settings, parse_batch_range, write_fp16_graph
from mimc.models.vit import build_encoder
from mimc.latency.devices import load_profile
from mimc.graph import graph_precision
from mimc.latency.tensorrt_gpu import profile_engine
from mimc.runtime.trt import check_engine_compat, parse_sparsity_log, sidecar_path
from tests.conftest import tiny_config
from tests.deploy.fake_tensorrt import H100, FakeDevice, fake_tensorrt

DYNAMIC = {"pixel_values": [None, 3, 32, 32]}


# Pure settings ---------------------------------------------------------------------------------------
def test_settings_for_a_dense_fp32_graph_on_h100():
    s = builder_settings(load_profile("h100"), "fp32", DYNAMIC, workspace_gb=2)
    assert s["network_flags"] == ["STRONGLY_TYPED"] and s["builder_flags"] == [] and not s["sparse"]
    assert s["workspace_bytes"] == 2 << 30 and s["precision"] == "fp32"
    assert s["shapes"]["pixel_values"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [128, 3, 32, 32]}
    s = builder_settings(load_profile("h100"), "fp32", DYNAMIC, batch_range=(1, 8, 32))
    assert s["batch_range"] == [1, 8, 32] and s["shapes"]["pixel_values"]["opt"][0] == 8


def test_sparse_weights_follow_the_manifest_and_the_device():
    assert builder_settings(load_profile("h100"), "int8", DYNAMIC, nm_pattern="2:4")["builder_flags"] == ["SPARSE_WEIGHTS"]
    t4 = builder_settings(load_profile("t4"), "int8", DYNAMIC, nm_pattern="2:4")
    assert not t4["sparse"] and "no sparse tensor cores" in t4["notes"][0]
    assert not builder_settings(load_profile("h100"), "fp16", DYNAMIC, nm_pattern="4:8")["sparse"]
    assert not builder_settings(load_profile("h100"), "fp16", DYNAMIC, sparse=False, nm_pattern="2:4")["sparse"]
    with pytest.raises(ConfigError, match="no sparse-capable tensor cores: build without sparse") as info:
        builder_settings(load_profile("t4"), "fp16", DYNAMIC, sparse=True)
    assert info.value.options == ("sparse",)


@pytest.mark.parametrize(
    "device, graph, kwargs, message",
    [
        ("a100", "fp8", {}, "has no fp8"),
        ("a100", "fp32", {"precision": "fp8"}, "has no fp8"),
        ("h100", "fp32", {"precision": "int8"}, "mimc quantize"),
        ("h100", "int8", {"precision": "fp16"}, "graph is int8"),
        ("cpu", "fp32", {}, "TensorRT device"),
        ("h100", "fp32", {"workspace_gb": 500}, "workspace"),
        ("h100", "fp32", {"precision": "fp4"}, "unknown precision"),
    ],
)
def test_bad_settings_are_one_line_exit_2(device, graph, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        builder_settings(load_profile(device), graph, DYNAMIC, **kwargs)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_fp16_is_written_from_fp32_and_static_batches_are_respected():
    assert builder_settings(load_profile("l4"), "fp32", DYNAMIC, precision="fp16")["write_fp16_graph"]
    static = {"pixel_values": [4, 3, 32, 32]}
    assert builder_settings(load_profile("l4"), "fp32", static)["batch_range"] == [4, 4, 4]
    with pytest.raises(ConfigError, match="static batch of 4"):
        builder_settings(load_profile("l4"), "fp32", static, batch_range=(1, 8, 32))


@pytest.mark.parametrize("text, expected", [("1:8:32", (1, 8, 32)), ("8", (8, 8, 8)), ("1:16", (1, 16, 16)), (None, None)])
def test_parse_batch_range(text, expected):
    assert parse_batch_range(text) == expected


@pytest.mark.parametrize("text", ["a:b", "8:4:2", "0", "1:2:3:4"])
def test_parse_batch_range_rejects(text):
    with pytest.raises(ConfigError, match="batch '") as info:
        parse_batch_range(text)
    assert info.value.options == ("batch",)  # the CLI words it as --batch (test_cli_build_bad_input_exits_2)


def test_sparsity_log_parsing():
    log = ["[I] (Sparsity) Layers eligible for sparse math: fc1, fc2 + Gelu, proj",
           "(Sparsity) TRT inference plan picked sparse implementation for layers: fc2 + Gelu", "unrelated"]
    assert parse_sparsity_log(log) == {"eligible": ["fc1", "fc2 + Gelu", "proj"], "picked": ["fc2 + Gelu"]}
    assert parse_sparsity_log(["(Sparsity) TRT inference plan picked sparse implementation for layers:"])["picked"] == []


def test_engine_compatibility_check(tmp_path):
    side = {"format": "mimc-tensorrt-engine", "tensorrt_version": "10.9.0", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    here = {"tensorrt_version": "10.9.0", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    check_engine_compat(side, here, tmp_path / "e.plan")
    with pytest.raises(BadInputError, match=r"built for NVIDIA A100.*this GPU is NVIDIA H100") as info:
        check_engine_compat(side, {**here, "gpu_name": H100[0], "compute_capability": "9.0"}, "e.plan")
    assert info.value.exit_code == 2
    with pytest.raises(BadInputError, match="TensorRT 10.9.0 but this is TensorRT 11.4.0"):
        check_engine_compat(side, {**here, "tensorrt_version": "11.4.0"}, "e.plan")
    with pytest.raises(BadInputError, match="not a mimc engine sidecar"):
        check_engine_compat({}, here, "e.plan")


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(build_encoder(tiny_config(), seed=0), path, batch="dynamic", validate=False)
    return path


def test_build_with_fake_tensorrt_writes_engine_sidecar_and_timing_cache(tmp_path, tiny_graph, monkeypatch):
    device, calls = FakeDevice(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device, calls))
    from mimc.compression.nm import NMSparsityConfig, sparsify

    sparse_encoder, _ = sparsify(build_encoder(tiny_config(), seed=0), NMSparsityConfig(pattern="2:4"))
    graph = tmp_path / "model.onnx"  # export stamps the encoder config, N:M pattern included, in the graph
    export_onnx(sparse_encoder, graph, batch="dynamic", validate=False)
    cache = tmp_path / "trt.cache"
    side = build_engine(graph, load_profile("h100"), tmp_path / "e.plan", batch_range="1:4:8", workspace_gb=1,
                        timing_cache=cache, device=device)
    assert (tmp_path / "e.plan").read_bytes() == b"ENGINE-BYTES"
    assert json.loads(sidecar_path(tmp_path / "e.plan").read_text()) == side
    assert (side["gpu_name"], side["compute_capability"], side["tensorrt_version"]) == (*H100, "10.9.0")
    assert calls["network_flags"] == 1 << 5 and calls["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert calls["workspace"] == ("WORKSPACE", 1 << 30) and calls["verbosity"] == "DETAILED"
    assert calls["profiles"] == [{"pixel_values": ([1, 3, 32, 32], [4, 3, 32, 32], [8, 3, 32, 32])}]
    assert side["sparse"] == {"requested": True, "eligible_layers": ["fc1", "fc2"], "picked_layers": ["fc2"],
                              "inspector_sparse_layers": ["fc2"], "picked": True}
    assert cache.read_bytes() == b"+tuned" and calls["cache_in"] == b""
    build_engine(graph, load_profile("h100"), tmp_path / "e2.plan", timing_cache=cache, device=device)
    assert calls["cache_in"] == b"+tuned"  # the second build starts from the first one's timings


def test_build_reports_honestly_when_no_sparse_kernel_was_picked(tmp_path, tiny_graph, monkeypatch):
    device, calls = FakeDevice(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device, calls, picked=()))
    side = build_engine(tiny_graph, load_profile("h100"), tmp_path / "e.plan", sparse=True, device=device)
    assert side["sparse"]["picked_layers"] == [] and side["sparse"]["eligible_layers"] == ["fc1", "fc2"]


def test_build_fp16_writes_the_cast_graph(tmp_path, tiny_graph, monkeypatch):
    device, calls = FakeDevice(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device, calls))
    side = build_engine(tiny_graph, load_profile("h100"), tmp_path / "e.plan", precision="fp16", device=device)
    assert side["precision"] == "fp16" and calls["parsed"].endswith("model.fp16.onnx")
    assert side["fp16_graph_validation"]["fidelity"]["image_cosine_min"] >= 0.999
    assert graph_precision(calls["parsed"]) == "fp16"


def test_build_refuses_the_wrong_gpu_and_missing_tensorrt(tmp_path, tiny_graph, monkeypatch):
    calls = {}
    a100 = FakeDevice("NVIDIA A100-SXM4-80GB", "8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(a100, calls))
    with pytest.raises(ConfigError, match="'h100' is compute capability 9.0 but this GPU is NVIDIA A100"):
        build_engine(tiny_graph, load_profile("h100"), tmp_path / "e.plan", device=a100)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[gpu\]'") as info:
        build_engine(tiny_graph, load_profile("h100"), tmp_path / "e.plan")
    assert info.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_profile_engine_with_fake_tensorrt(tmp_path, tiny_graph, monkeypatch):
    device, calls = FakeDevice(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device, calls))
    build_engine(tiny_graph, load_profile("h100"), tmp_path / "e.plan", batch_range="1:4:8", device=device)
    report = profile_engine(tmp_path / "e.plan", load_profile("h100"), warmup=3, iters=20, layer_iters=4, device=device)
    assert report["label"] == "measured" and [r["batch"] for r in report["results"]] == [1, 8]  # 32, 128 beyond max
    assert report["skipped_batch_sizes"] == [32, 128]
    for row in report["results"]:
        assert row["latency_ms"]["p50"] == pytest.approx(1.5 * row["batch"])
        assert row["throughput_per_s"] == pytest.approx(1000 / 1.5)
        assert [x["layer"] for x in row["layers"]] == ["fc1", "fc2"] and row["layers"][0]["share"] == pytest.approx(2 / 3)
    assert calls["addresses"] == {"pixel_values", "pooled"} and report["memory"]["activation_bytes"] == 12345
    with pytest.raises(ConfigError, match="outside the engine's range 1..8"):
        profile_engine(tmp_path / "e.plan", load_profile("h100"), batch_sizes=[16], device=device)
    # An engine from another GPU or TensorRT is refused before anything runs.
    side = json.loads(sidecar_path(tmp_path / "e.plan").read_text())
    sidecar_path(tmp_path / "e.plan").write_text(json.dumps({**side, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}))
    with pytest.raises(BadInputError, match="built for NVIDIA L4"):
        profile_engine(tmp_path / "e.plan", load_profile("h100"), device=device)
    sidecar_path(tmp_path / "e.plan").unlink()
    with pytest.raises(BadInputError, match="has no sidecar"):
        profile_engine(tmp_path / "e.plan", load_profile("h100"), device=device)


def test_no_gpu_here_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from mimc.runtime.cuda_ort import profile_onnx_cuda
    from mimc.runtime.trt import CudaDevice

    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        CudaDevice()
    with pytest.raises((DeviceUnavailableError, MissingExtraError), match=r"mimc\[gpu\]"):
        profile_onnx_cuda(tmp_path / "x.onnx", load_profile("h100"))


def test_fp16_graph_keeps_norms_and_softmax_in_fp32(tmp_path, tiny_graph):
    import onnxruntime as ort

    out = tmp_path / "model.fp16.onnx"
    fidelity = write_fp16_graph(tiny_graph, out)
    assert fidelity["checked"] and fidelity["passed"] and fidelity["fidelity"]["image_cosine_min"] >= 0.999
    model = onnx.load(str(out))
    assert graph_precision(model) == "fp16"
    inferred = onnx.shape_inference.infer_shapes(model)
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types_[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_graph), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[1]
    half = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[1]
    cos = (ref * half).sum() / np.linalg.norm(ref) / np.linalg.norm(half)
    assert cos > 0.999


def test_measure_session_on_cpu(tiny_graph):
    import onnxruntime as ort

    from mimc.runtime.cuda_ort import measure_session

    sess = ort.InferenceSession(str(tiny_graph), providers=["CPUExecutionProvider"])
    row = measure_session(sess, batch=2, warmup=1, iters=5, device="cpu")
    assert row["batch"] == 2 and 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
    assert row["throughput_per_s"] == pytest.approx(2000 / row["latency_ms"]["p50"])


@pytest.mark.gpu
def test_real_engine_build_and_profile(tmp_path, tiny_graph):
    pytest.importorskip("tensorrt")
    from mimc.runtime.trt import CudaDevice

    device = CudaDevice()
    profiles = {"9.0": "h100", "8.0": "a100", "8.9": "l4", "7.5": "t4", "8.7": "jetson-orin"}
    if device.compute_capability not in profiles:
        pytest.skip(f"no shipped profile for compute capability {device.compute_capability}")
    profile = load_profile(profiles[device.compute_capability])
    if device.compute_capability == "8.9" and "4090" in device.name:
        profile = load_profile("rtx-4090")
    cache = tmp_path / "trt.cache"
    side = build_engine(tiny_graph, profile, tmp_path / "e.plan", batch_range="1:2:4", precision="fp16", workspace_gb=1,
                        timing_cache=cache)
    assert side["gpu_name"] == device.name and cache.stat().st_size > 0
    # A second build in the same process reuses the cache and the process-wide logger.
    again = build_engine(tiny_graph, profile, tmp_path / "e2.plan", batch_range="1:2:4", precision="fp16", workspace_gb=1,
                         timing_cache=cache)
    assert not [n for n in again["notes"] if "timing cache" in n]
    report = profile_engine(tmp_path / "e.plan", profile, batch_sizes=[1, 4], warmup=5, iters=20, layer_iters=3)
    assert [r["batch"] for r in report["results"]] == [1, 4] and report["results"][0]["latency_ms"]["p50"] > 0
    layers = report["results"][0]["layers"]  # IProfiler callbacks from execute_async_v3
    assert layers and sum(r["share"] for r in layers) == pytest.approx(1.0)
    assert report["memory"]["activation_bytes"] >= 0


@pytest.mark.gpu
def test_real_onnxruntime_cuda_provider(tiny_graph):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (install onnxruntime-gpu)")
    from mimc.runtime.cuda_ort import profile_onnx_cuda

    report = profile_onnx_cuda(tiny_graph, load_profile("h100"), batch_sizes=[1, 2], warmup=2, iters=10)
    assert [r["batch"] for r in report["results"]] == [1, 2] and report["results"][0]["latency_ms"]["p50"] > 0


# The CLI -------------------------------------------------------------------------------------------
def _cli(args):
    from typer.testing import CliRunner

    from mimc.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "h900"], "unknown device 'h900'"),
        (["--device", "a100", "--precision", "fp8"], "has no fp8"),
        (["--device", "cpu"], "TensorRT device"),
        (["--device", "h100", "--batch", "8:1"], "--batch"),
        (["--device", "h100", "--precision", "int8"], "mimc quantize"),
        (["--device", "t4", "--sparse"], "no sparse-capable tensor cores: build without --sparse"),
    ],
)
def test_cli_build_bad_input_exits_2(tiny_graph, extra, message):
    result = _cli(["build", tiny_graph, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1


def test_cli_build_missing_graph_and_missing_tensorrt(tmp_path, tiny_graph, monkeypatch):
    result = _cli(["build", tmp_path / "nope.onnx", "--device", "h100"])
    assert result.exit_code == 2 and "does not exist" in result.output
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    before = set(tiny_graph.parent.iterdir())
    result = _cli(["build", tiny_graph, "--device", "h100"])
    assert result.exit_code == 2 and "pip install 'mimc[gpu]'" in result.output
    assert set(tiny_graph.parent.iterdir()) == before  # nothing written


def test_cli_build_with_fake_tensorrt(tmp_path, tiny_graph, monkeypatch):
    device, calls = FakeDevice(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device, calls))
    monkeypatch.setattr("mimc.runtime.trt.CudaDevice", lambda: device)
    out = tmp_path / "h100-fp16.plan"
    result = _cli(["build", tiny_graph, "--device", "h100", "--precision", "fp16", "--batch", "1:2:4", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == str(out) and out.is_file() and sidecar_path(out).is_file()
    assert report["sidecar"]["precision"] == "fp16" and report["sidecar"]["batch_range"] == [1, 2, 4]


def test_fp16_graph_below_the_gate_is_not_written(tmp_path, tiny_graph, monkeypatch):
    from mimc.errors import ValidationError

    # A converter that breaks the graph (every weight zeroed) must be caught by the fidelity gate.
    import onnxruntime.transformers.float16 as f16

    real = f16.convert_float_to_float16

    def broken(model, **kwargs):
        half = real(model, **kwargs)
        for init in half.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT16 and len(init.dims) == 2:
                init.raw_data = bytes(len(init.raw_data))
        return half

    monkeypatch.setattr(f16, "convert_float_to_float16", broken)
    with pytest.raises(ValidationError, match="fp16 fidelity gate"):
        write_fp16_graph(tiny_graph, tmp_path / "model.fp16.onnx")
    assert not list(tmp_path.iterdir())
