"""Device profiles: every shipped one loads and names a source for each number; bad YAML exits 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import mimc
from mimc.errors import ConfigError
from mimc.latency.devices import PRECISIONS, available_profiles, load_profile

GPU_PROFILES = ["h100", "h200", "a100", "l4", "t4", "jetson-orin", "rtx-4090"]


def test_every_gpu_target_is_shipped():
    assert set(GPU_PROFILES) <= set(available_profiles())


@pytest.mark.parametrize("name", sorted(set(GPU_PROFILES) | {"cpu"}))
def test_shipped_profile_loads_with_a_source_for_each_number(name):
    p = load_profile(name)
    assert p.name == name
    assert set(p.peak_tflops) <= set(p.precisions), "a peak for a precision the device does not run"
    for field in ("peak_tflops", "memory_bandwidth_gbs", "memory_gb"):
        assert p.sources.get(field, "").strip(), f"{name}: no public source for {field}"
    if p.backend == "tensorrt":
        assert p.compute_capability and p.sources.get("compute_capability")
        assert p.sources.get("sparse_tensor_cores")
        assert "fp16" in p.precisions and "int8" in p.precisions
    assert all(b >= 1 for b in p.batch_sizes)


def test_h100_numbers_match_the_datasheet():
    p = load_profile("h100")
    assert p.peak_tflops["fp16"] == pytest.approx(989, rel=0.01)
    assert p.peak_tflops["int8"] == pytest.approx(1979, rel=0.01) and p.peak_tflops["fp8"] == pytest.approx(1979, rel=0.01)
    assert p.memory_bandwidth_gbs == pytest.approx(3350)
    assert p.peak_flops("fp16", sparse=True) == pytest.approx(2 * p.peak_flops("fp16"))


def test_precision_capabilities_follow_the_architecture():
    assert "fp8" not in load_profile("a100").precisions  # Ampere has no fp8
    t4 = load_profile("t4")
    assert not t4.sparse_tensor_cores and "bf16" not in t4.precisions
    assert t4.peak_flops("int8", sparse=True) == t4.peak_flops("int8")  # no sparse credit without sparse TCs
    assert load_profile("h200").memory_bandwidth_gbs > load_profile("h100").memory_bandwidth_gbs


def test_peak_fallback_and_missing_peak():
    a100 = load_profile("a100")
    assert a100.peak_flops("bf16") == a100.peak_flops("fp16")
    with pytest.raises(ConfigError, match="no peak_tflops for fp8"):
        a100.peak_flops("fp8")


def _write(tmp_path, data):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_yaml_is_accepted(tmp_path):
    data = load_profile("l4").to_dict()
    data["name"] = "my-l4"
    p = load_profile(_write(tmp_path, data))
    assert p.name == "my-l4" and p.peak_tflops == load_profile("l4").peak_tflops


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("memory_bandwidth_gbs"), "missing field"),
        (lambda d: d.update(backend="cuda-magic"), "backend"),
        (lambda d: d.update(precisions=["fp4"]), "unknown precision"),
        (lambda d: d["peak_tflops"].update(fp16=-1), "positive"),
        (lambda d: d["peak_tflops"].update(fp32=float("nan")), "positive finite"),  # was accepted: predicted latency nan
        (lambda d: d.update(memory_bandwidth_gbs=float("inf")), "positive finite"),
        # was accepted: a predicted latency of inf, printed by --json as Infinity (not JSON)
        (lambda d: d.update(memory_bandwidth_gbs=1e-320), "at least 1e-06"),
        (lambda d: d["peak_tflops"].update(fp16=1e-320), "at least 1e-06"),
        (lambda d: d.update(peak_tflops=["fp16"]), "wrong type"),  # was an AttributeError traceback
        (lambda d: d.update(sources="datasheet"), "wrong type"),  # `mimc profiles FILE` crashed
        (lambda d: d.update(sparse_tensor_cores="maybe"), "wrong type"),  # was read as true
        (lambda d: d.update(precisions="fp16"), "wrong type"),  # was refused as precisions 'f', 'p', '1', '6'
        (lambda d: d["peak_tflops"].update(int3=5), "unknown precision"),
        (lambda d: d.update(colour="green"), "unknown field"),
        (lambda d: d.update(threads="abc"), "threads"),  # was a ValueError traceback when measured
        (lambda d: d.update(threads=0.5), "threads"),  # was refused as if --threads had been given
        (lambda d: d.update(threads=0), "threads"),
        (lambda d: d.update(batch_sizes="8"), "batch_sizes"),  # was read as ('8',)
        (lambda d: d.update(batch_sizes=[0]), "batch_sizes"),
        (lambda d: d.update(batch_sizes=[]), "batch_sizes"),
        (lambda d: d.update(batch_sizes=[1, 10**9]), "batch_sizes go up to 4096"),  # was accepted: a 600 TB ViT-B input
        (lambda d: d.update(precisions=[]), "precisions"),  # was accepted: "device 'h100' has only : pick a device with fp32"
    ],
)
def test_broken_yaml_is_one_clear_line(tmp_path, change, message):
    data = load_profile("h100").to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(_write(tmp_path, data))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_a_profile_name_is_a_plain_name_not_a_path(tmp_path):
    """`name: ../escaped` in a user's YAML: `mimc build DIR/model.onnx --device mine.yaml` wrote
    DIR/../escaped-fp32.xml (outputs are named after the profile), outside the graph's folder; an empty
    name wrote a hidden `-fp32.xml`."""
    data = load_profile("openvino-cpu").to_dict()
    for name in ("../escaped", "a/b", "", ".", ".."):
        data["name"] = name
        with pytest.raises(ConfigError, match="name") as info:
            load_profile(_write(tmp_path, data))
        assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_unknown_device_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown device 'h900'.*h100") as info:
        load_profile("h900")
    assert info.value.exit_code == 2
    (tmp_path / "dir.yaml").mkdir()  # a .yaml path that is no file was 'unknown device ...: or pass a profile .yaml path'
    for name, what in (("missing.yaml", "does not exist"), ("dir.yaml", "is a folder")):
        with pytest.raises(ConfigError, match=f"{name} {what}: give a profile .yaml file or a known device .*h100"):
            load_profile(tmp_path / name)


def test_precisions_are_known():
    for name in available_profiles():
        assert set(load_profile(name).precisions) <= set(PRECISIONS)


def test_cli_profiles_lists_every_target_and_reads_a_yaml(tmp_path):
    import json

    from typer.testing import CliRunner

    from mimc.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["profiles", "--json"])
    assert result.exit_code == 0
    assert {p["name"] for p in json.loads(result.stdout)} == set(available_profiles())
    result = runner.invoke(app, ["profiles", "h100"])
    assert result.exit_code == 0 and "3.35 TB/s" in result.output
    data = load_profile("t4").to_dict()
    data["name"] = "my-t4"
    result = runner.invoke(app, ["profiles", str(_write(tmp_path, data)), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["name"] == "my-t4"
    result = runner.invoke(app, ["profiles", "h900"])
    assert result.exit_code == 2 and "unknown device 'h900'" in result.output


def test_short_names_resolve_to_shipped_profiles():
    assert load_profile("orin").name == "jetson-orin"
    assert load_profile("4090").name == "rtx-4090"


def test_profile_yaml_is_read_as_strictly_as_a_recipe(tmp_path):
    """Device profiles had their own loader: a duplicate key kept the last value silently and
    `memory_bandwidth_gbs: 1e3` (YAML 1.1 reads an exponent without a dot as text) was refused."""
    shipped = (Path(mimc.__file__).parent / "profiles" / "cpu.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(shipped + "\nmemory_gb: 1\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load_profile(twice)
    exponent = tmp_path / "exponent.yaml"
    exponent.write_text(re.sub(r"(?m)^memory_bandwidth_gbs:.*$", "memory_bandwidth_gbs: 1e3", shipped))
    assert load_profile(exponent).memory_bandwidth_gbs == 1000.0


def test_a_profiles_threads_are_at_most_the_cores_here(tmp_path, monkeypatch):
    """A YAML's `threads: 100000` went unchecked to ONNX Runtime / OpenVINO (only --threads was checked):
    profile and build now run at most the cores here (the report says the threads used)."""
    import os

    import mimc.latency.openvino_cpu as openvino_cpu
    import mimc.latency.ort_cpu as ort_cpu
    import mimc.runtime.openvino as openvino
    from mimc.deploy.onnx import export_onnx
    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    seen = []

    def ran(*args, **kwargs):  # the runtime is never started: its thread count is recorded instead
        seen.append(args[5] if len(args) > 5 else args[2])
        raise ConfigError("recorded")

    for module, name in ((ort_cpu, "measure_batches"), (openvino_cpu, "measure_batches"), (openvino, "compile_model")):
        monkeypatch.setattr(module, name, ran)
    graph = tmp_path / "g.onnx"
    export_onnx(build_encoder(tiny_config(), seed=0), graph, validate=False)
    many = {base: tmp_path / f"{base}.yaml" for base in ("cpu", "openvino-cpu")}
    for base, path in many.items():
        path.write_text(yaml.safe_dump({**load_profile(base).to_dict(), "threads": 100000}))
    cores = len(os.sched_getaffinity(0))
    for call in (lambda: mimc.profile(graph, str(many["cpu"])), lambda: mimc.profile(graph, str(many["openvino-cpu"])),
                 lambda: mimc.build(graph, str(many["openvino-cpu"]), output=tmp_path / "g.xml")):
        with pytest.raises(ConfigError, match="recorded"):
            call()
    assert seen == [cores] * 3 and load_profile(many["cpu"]).threads == 100000
