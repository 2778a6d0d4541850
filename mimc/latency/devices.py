"""Device profiles: what a deployment target is, read from ``profiles/*.yaml`` or a user's YAML.

A profile names a backend and the numbers a roofline needs. Shipped profiles live in
``mimc/profiles/`` (package data); ``--device`` accepts their name or a path to a YAML file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mimc.errors import ConfigError, clip
from mimc.options import MAX_BATCH
from mimc.runtime.timing import cores_here
from mimc.yamlfile import read_yaml

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
BACKENDS = ("onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "tensorrt")
# int8-bf16: an int8 graph whose float layers run in bf16 (OpenVINO CPU)
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "int8-bf16", "fp8")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    backend: str
    precisions: tuple[str, ...]
    peak_tflops: dict[str, float]  # dense peak per precision (2:4 sparse doubles on sparse tensor cores)
    memory_bandwidth_gbs: float
    memory_gb: float
    batch_sizes: tuple[int, ...] = (1,)
    description: str = ""
    compute_capability: str | None = None  # "9.0" for Hopper; None for CPUs
    sparse_tensor_cores: bool = False
    threads: int | None = None  # CPU profiles: intra-op threads to measure with
    sources: dict[str, str] = field(default_factory=dict)  # field -> public source of the number

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self) for v in [getattr(self, f.name)]}

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def peak_flops(self, precision: str, sparse: bool = False) -> float:
        """Peak FLOP/s for ``precision`` (dense; doubled for 2:4 sparse math on sparse tensor cores).

        A precision without its own peak falls back to the nearest wider one that has one (bf16 ->
        fp16 -> fp32), because a device without, say, a bf16 number runs it no faster than fp16.
        """
        for p in _PEAK_FALLBACK.get(precision, (precision,)):
            if p in self.peak_tflops:
                scale = 2.0 if sparse and self.sparse_tensor_cores else 1.0
                return self.peak_tflops[p] * 1e12 * scale
        raise ConfigError(f"device profile {self.name} has no peak_tflops for {precision}: add it to the profile YAML")

    def threads_here(self) -> int | None:
        """``threads`` to measure with, at most the cores here (a YAML's threads: 100000 reached ONNX Runtime
        and OpenVINO; the reports say the threads used)."""
        return None if self.threads is None else min(self.threads, cores_here())

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9


# Precisions not listed here (fp32, int8, fp8) have no fallback.
_PEAK_FALLBACK = {
    "tf32": ("tf32", "fp32"),
    "fp16": ("fp16", "fp32"),
    "bf16": ("bf16", "fp16", "fp32"),
    "int8-bf16": ("int8-bf16", "int8"),  # its matmuls are the int8 ones
}

REQUIRED = ("name", "backend", "precisions", "peak_tflops", "memory_bandwidth_gbs", "memory_gb")


# Short names people type for shipped profiles (`--device orin` as in the README).
ALIASES = {"orin": "jetson-orin", "agx-orin": "jetson-orin", "4090": "rtx-4090", "h100-sxm": "h100", "h200-sxm": "h200"}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(device: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a YAML file by path; one-line errors for anything wrong."""
    path = Path(device)
    if path.suffix in (".yaml", ".yml") and not path.is_file():  # was "unknown device ...: or pass a profile .yaml path"
        raise ConfigError(f"device profile {path} {'is a folder' if path.is_dir() else 'does not exist'}: give a profile .yaml file "
                          f"or a known device ({', '.join(available_profiles())})")
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{ALIASES.get(str(device).lower(), device)}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown device '{device}': known devices are {', '.join(available_profiles())}, or pass a profile .yaml path")
    data = read_yaml(path, "device profile", ConfigError)  # strict: no anchors/aliases, no duplicate keys
    if not isinstance(data, dict):
        raise ConfigError(f"device profile {path} is not a mapping: see mimc/profiles/cpu.yaml for the format")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"device profile {path} is missing field(s) {missing}: add them (see mimc/profiles/cpu.yaml)")
    known = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"device profile {path} has unknown field(s) {unknown}: valid fields are {sorted(known)}")
    kinds = {"name": str, "description": str, "precisions": list, "peak_tflops": dict, "sources": dict,
             "sparse_tensor_cores": bool, "compute_capability": (str, int, float, type(None))}
    wrong = [k for k, kind in kinds.items() if k in data and not isinstance(data[k], kind)]
    if wrong:
        raise ConfigError(f"device profile {path}: {wrong} of the wrong type (name and description are text, precisions a list, "
                          "peak_tflops and sources mappings, sparse_tensor_cores true or false): fix the file (see mimc/profiles/h100.yaml)")
    if data["name"] in ("", ".", "..") or Path(data["name"]).name != data["name"]:  # outputs are named after it
        raise ConfigError(f"device profile {path}: name {clip(data['name'])} must be a plain name (no '/', not empty), "
                          "like my-cpu: fix the file")
    if data["backend"] not in BACKENDS:
        raise ConfigError(f"device profile {path}: backend '{data['backend']}' is not one of {BACKENDS}")
    for key, where in (("precisions", ""), ("peak_tflops", "peak_tflops has ")):
        bad = [p for p in data[key] if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"device profile {path}: {where}unknown precision(s) {bad}; valid: {PRECISIONS}")
    if not data["precisions"]:
        raise ConfigError(f"device profile {path}: precisions is empty: list those the device runs, e.g. [fp32, int8]")
    numbers = {f"peak_tflops.{k}": v for k, v in data["peak_tflops"].items()}
    numbers.update(memory_bandwidth_gbs=data["memory_bandwidth_gbs"], memory_gb=data["memory_gb"])
    # at least 1e-6 (a KB/s, a MFLOP/s): a bytes / bandwidth or flops / peak past the float range would be inf
    not_positive = [k for k, v in numbers.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or not 1e-6 <= v < math.inf]
    if not_positive:
        raise ConfigError(f"device profile {path}: {not_positive} must be positive finite numbers (at least 1e-06): fix the file")
    counts = {"threads": [1] if data.get("threads") is None else [data["threads"]], "batch_sizes": data.get("batch_sizes", [1])}
    not_counts = [k for k, v in counts.items() if not isinstance(v, list) or not v or not all(type(n) is int and n >= 1 for n in v)]
    if not_counts:
        raise ConfigError(f"device profile {path}: {not_counts} must be positive integers (batch_sizes a non-empty list of them): fix the file")
    if max(counts["batch_sizes"]) > MAX_BATCH:
        raise ConfigError(f"device profile {path}: batch_sizes go up to {MAX_BATCH}, not {max(counts['batch_sizes'])}: fix the file")
    data["precisions"] = tuple(data["precisions"])
    data["batch_sizes"] = tuple(data.get("batch_sizes", (1,)))
    data["peak_tflops"] = {str(k): float(v) for k, v in data["peak_tflops"].items()}
    if data.get("compute_capability") is not None:
        data["compute_capability"] = str(data["compute_capability"])
    return DeviceProfile(**data)
