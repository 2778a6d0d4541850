"""CPU profiling on ONNX Runtime and the profile dispatcher (measured / predicted / GPU)."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError
from mimc.deploy.onnx import export_onnx
from mimc.models.vit import build_encoder
from mimc.latency import run as run_mod
from mimc.latency.ort_cpu import profile_onnx_cpu
from mimc.latency.run import parse_batch_sizes, profile
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    encoder = build_encoder(tiny_config(), seed=0)
    export_onnx(encoder, folder / "dynamic.onnx", batch="dynamic", validate=False)
    export_onnx(encoder, folder / "static2.onnx", batch=2, validate=False)
    return folder


def test_measured_report_has_sane_numbers(graphs):
    report = profile_onnx_cpu(graphs / "dynamic.onnx", [1, 3], warmup=2, iters=15, threads=1)
    import onnxruntime

    assert report["label"] == "measured"
    assert report["onnxruntime_version"] == onnxruntime.__version__
    assert "onnxruntime" in report["onnxruntime_distribution"]  # which wheel: onnxruntime or onnxruntime-gpu
    assert report["provider"] == "CPUExecutionProvider" and report["threads"] == 1
    assert report["session_options"]["session.intra_op.allow_spinning"] == "0"
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_items_s"] == pytest.approx(r["batch"] * 1e3 / r["mean_ms"], rel=1e-6)
        # A worker process holds at least the ORT library; the session adds something on top.
        assert r["peak_rss_mb"] > 10 and 0 < r["session_mb"] < r["peak_rss_mb"]


def test_static_batch_graph_runs_only_at_its_batch(graphs):
    report = profile_onnx_cpu(graphs / "static2.onnx", None, warmup=1, iters=3, threads=1)
    assert [r["batch"] for r in report["results"]] == [2]
    with pytest.raises(BadInputError, match="static batch of 2"):
        profile_onnx_cpu(graphs / "static2.onnx", [4], warmup=1, iters=3)


def test_worker_process_does_not_load_torch():
    # The memory figure is only meaningful if the worker stays a minimal ORT process.
    code = "import sys, mimc.runtime.ort, mimc.runtime.session, mimc.deploy.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_profile_dispatch_cpu_uses_profile_threads_and_sizes(graphs):
    from mimc.latency.devices import load_profile

    cpu = load_profile("cpu")
    report = profile(graphs / "dynamic.onnx", device="cpu", warmup=1, iters=3)
    assert report["label"] == "measured" and report["device"] == "cpu"
    if cpu.threads:
        assert report["threads"] == cpu.threads
    assert [r["batch"] for r in report["results"]] == list(cpu.batch_sizes)  # a dynamic graph runs the profile's sizes
    assert profile(graphs / "dynamic.onnx", device="cpu", warmup=0, iters=1, threads=1, batch_sizes="2")["threads"] == 1


def test_predict_is_labelled_predicted(graphs):
    pytest.importorskip("mimc.latency.roofline")
    report = profile(graphs / "static2.onnx", device="h100", predict=True)
    assert report["label"] == "predicted"
    assert [r["batch"] for r in report["results"]] == [2]
    assert all(r["label"] == "predicted" and r["latency_ms"] > 0 for r in report["results"])
    assert "p50_ms" not in report["results"][0]  # never mixed with measured fields


def test_gpu_device_without_cuda_is_refused(graphs, monkeypatch):
    monkeypatch.setattr(run_mod, "cuda_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="device h100 needs a CUDA GPU, none found"):
        profile(graphs / "dynamic.onnx", device="h100")


def test_gpu_dispatch_reaches_the_engine_profiler(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mimc.latency.tensorrt_gpu")
    fake.profile_engine = lambda path, prof, sizes, warmup, iters, on_message=None: calls.append((path.name, prof.name, sizes)) or {"results": []}
    monkeypatch.setitem(sys.modules, "mimc.latency.tensorrt_gpu", fake)
    monkeypatch.setattr(run_mod, "cuda_available", lambda: True)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    report = profile(engine, device="h100", batch_sizes="1,4")
    assert calls == [("model.plan", "h100", [1, 4])] and report["label"] == "measured"


def test_bad_inputs(graphs, tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        profile(tmp_path / "nope.onnx")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(BadInputError, match="not an ONNX graph"):
        profile(text)
    with pytest.raises(BadInputError, match="directory"):
        profile(graphs)
    fake_onnx = tmp_path / "fake.onnx"
    fake_onnx.write_bytes(b"\x00garbage")
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        profile(fake_onnx, iters=1, warmup=0)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    with pytest.raises(BadInputError, match="TensorRT engine"):
        profile(engine, device="cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        profile(graphs / "dynamic.onnx", device="tpu9")
    with pytest.raises(BadInputError, match="iters"):
        profile(graphs / "dynamic.onnx", iters=0)


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8, 8,2") == [1, 8, 2]
    assert parse_batch_sizes(None) is None
    for bad in ("0", "-1", "a", "1,,2", "4097", "100000000"):  # --batch 100000000 was timed: tens of GB of input
        with pytest.raises(BadInputError, match="positive integer"):
            parse_batch_sizes(bad)
