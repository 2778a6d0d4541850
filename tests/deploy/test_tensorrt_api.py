"""TensorRT / ONNX Runtime GPU API contracts that a first real GPU run would hit, checked against the fake
`tensorrt` (tests/export/fake_tensorrt.py) and fake ORT sessions: return-value failures, the single
process logger, timing caches from another machine, old TensorRT, CUDA-provider timing and libraries."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from mimc.errors import MimcError, MissingExtraError
from mimc.deploy.onnx import export_onnx
from mimc.deploy.tensorrt import build_engine
from mimc.models.vit import build_encoder
from mimc.latency.devices import load_profile
from mimc.latency.tensorrt_gpu import profile_engine
from mimc.runtime.trt import sidecar_path
from tests.conftest import tiny_config
from tests.deploy.fake_tensorrt import FakeDevice, fake_tensorrt


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from mimc.compression.nm import NMSparsityConfig, sparsify

    root = tmp_path_factory.mktemp("trt_api")
    (root / "dense").mkdir()
    (root / "nm").mkdir()
    export_onnx(build_encoder(tiny_config(), seed=0), root / "dense" / "model.onnx", batch="dynamic", validate=False)
    sparse, _ = sparsify(build_encoder(tiny_config(), seed=0), NMSparsityConfig(pattern="2:4"))
    export_onnx(sparse, root / "nm" / "model.onnx", batch="dynamic", validate=False)
    return root / "dense" / "model.onnx", root / "nm" / "model.onnx"


def _fake(monkeypatch, **kwargs):
    device, calls = FakeDevice(), {}
    trt = fake_tensorrt(device, calls, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return device, calls, trt


def test_tensorrt_8_is_refused_before_a_weakly_typed_build(tmp_path, graphs, monkeypatch):
    # 8.x has no STRONGLY_TYPED flag: building anyway would give an fp32 engine labelled int8/fp16.
    device, calls, _ = _fake(monkeypatch, version="8.6.1")
    with pytest.raises(MissingExtraError, match=r"TensorRT 8\.6\.1 is too old: mimc needs TensorRT >= 10") as info:
        build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", device=device)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert "network_flags" not in calls and not list(tmp_path.iterdir())


def test_second_build_in_one_process_reads_its_own_sparsity_report(tmp_path, graphs, monkeypatch):
    # TensorRT keeps the first logger while an earlier object lives: a new logger per build hears nothing.
    device, calls, trt = _fake(monkeypatch)
    dense, nm = graphs
    build_engine(dense, load_profile("h100"), tmp_path / "dense.plan", device=device)
    side = build_engine(nm, load_profile("h100"), tmp_path / "nm.plan", device=device)
    assert calls["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert side["sparse"]["eligible_layers"] == ["fc1", "fc2"] and side["sparse"]["picked_layers"] == ["fc2"]
    kept = trt._mimc_logger.messages
    assert kept and all(sev != trt.ILogger.Severity.VERBOSE for sev, _ in kept)  # 200 tactic lines dropped


@pytest.mark.parametrize("blob", [b"OTHER-GPU timings", b"CORRUPT"], ids=["other-gpu", "unreadable"])
def test_timing_cache_from_another_machine_is_set_aside_not_fatal(tmp_path, graphs, monkeypatch, blob):
    device, calls, _ = _fake(monkeypatch)
    cache = tmp_path / "trt.cache"
    cache.write_bytes(blob)
    side = build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", timing_cache=cache, device=device)
    assert (tmp_path / "e.plan").read_bytes() == b"ENGINE-BYTES"
    assert cache.read_bytes() == blob  # another machine's cache is not overwritten
    assert any("timing cache trt.cache" in n and "left the file unchanged" in n for n in side["notes"])
    assert json.loads(sidecar_path(tmp_path / "e.plan").read_text())["notes"] == side["notes"]


def test_rejected_optimization_profile_and_parse_errors_stop_the_build_in_one_line(tmp_path, graphs, monkeypatch):
    device, _, _ = _fake(monkeypatch, reject_profile=True)
    with pytest.raises(MimcError, match="rejected the optimization profile"):
        build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", device=device)
    device, _, _ = _fake(monkeypatch, parse_ok=False)
    with pytest.raises(MimcError, match="could not parse model.onnx: In node 3") as info:
        build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", device=device)
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


def test_failed_enqueue_is_an_error_not_a_timing(tmp_path, graphs, monkeypatch):
    device, _, _ = _fake(monkeypatch, enqueue_ok=False)
    build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", batch_range="1:4:8", device=device)
    with pytest.raises(MimcError, match="TensorRT execution failed: .*enqueueV3"):
        profile_engine(tmp_path / "e.plan", load_profile("h100"), warmup=1, iters=3, layer_iters=0, device=device)


def test_unresolved_output_shape_is_refused_before_a_short_buffer(tmp_path, graphs, monkeypatch):
    device, _, _ = _fake(monkeypatch, output_dims=(-1, -1))
    build_engine(graphs[0], load_profile("h100"), tmp_path / "e.plan", batch_range="1:4:8", device=device)
    with pytest.raises(MimcError, match="'pooled' has unresolved shape"):
        profile_engine(tmp_path / "e.plan", load_profile("h100"), warmup=1, iters=3, layer_iters=0, device=device)
    assert all(n > 0 for n in device.allocs)


# ONNX Runtime CUDA provider ----------------------------------------------------------------------
class _AsyncSession:
    """An ORT session whose run returns at once and whose outputs are ready only after a sync
    (what a CUDA provider with stream sync disabled looks like): the wait must be inside the clock."""

    def __init__(self, clock):
        self.clock = clock
        self.syncs = 0

    def get_inputs(self):
        return [types.SimpleNamespace(name="pixel_values", shape=["batch", 3, 4, 4], type="tensor(float)")]

    def get_outputs(self):
        return [types.SimpleNamespace(name="pooled")]

    def io_binding(self):
        session = self

        class Binding:
            def bind_ortvalue_input(self, name, value):
                pass

            def bind_output(self, name, device, device_id):
                pass

            def synchronize_outputs(self):
                session.clock.t += 0.005
                session.syncs += 1

        return Binding()

    def run_with_iobinding(self, binding):
        pass


def test_cuda_provider_timing_waits_for_the_outputs():
    from mimc.runtime.cuda_ort import measure_session

    clock = types.SimpleNamespace(t=0.0)
    sess = _AsyncSession(clock)
    row = measure_session(sess, batch=2, warmup=2, iters=5, device="cpu", clock=lambda: clock.t)
    assert row["latency_ms"]["p50"] == pytest.approx(5.0) and sess.syncs >= 5


def test_cuda_libraries_are_loaded_before_the_session(tmp_path, monkeypatch):
    import torch

    from mimc.runtime import cuda_ort

    order = []
    fake = types.ModuleType("onnxruntime")
    fake.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    fake.preload_dlls = lambda: order.append("preload")

    class Session:
        def __init__(self, path, providers):
            order.append("session")

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    fake.InferenceSession = Session
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    (tmp_path / "m.onnx").write_bytes(b"x")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU torch loads no CUDA libraries
    cuda_ort.cuda_session(tmp_path / "m.onnx")
    assert order == ["preload", "session"]
    order.clear()
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA torch already did; ORT reuses them
    cuda_ort.cuda_session(tmp_path / "m.onnx")
    assert order == ["session"]


# benchmarks/gpu_table.py -------------------------------------------------------------------------
def test_gpu_table_variants_can_rerun_into_the_same_folder(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_table.py"
    spec = importlib.util.spec_from_file_location("gpu_table_under_test", path)
    gpu_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_table)
    encoder = build_encoder(tiny_config(), seed=0)
    for _ in range(2):  # the second run used to die on mkdir (FileExistsError)
        name, graph, precision = next(gpu_table.variants(encoder, load_profile("h100"), None, None, tmp_path))
        assert (name, precision) == ("dense fp16", "fp16") and graph.is_file()


def test_cli_counts_sparse_layers_the_inspector_saw(tmp_path, graphs, monkeypatch):
    from typer.testing import CliRunner

    from mimc.cli.app import app

    device, _, _ = _fake(monkeypatch, picked=())  # the log names no layer; the engine inspector sees fc2
    monkeypatch.setattr("mimc.runtime.trt.CudaDevice", lambda: device)
    out = tmp_path / "nm.plan"
    result = CliRunner().invoke(app, ["build", str(graphs[1]), "--device", "h100", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "yes (1 layers)" in result.output
