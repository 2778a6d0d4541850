"""A small fake `tensorrt` module (and CUDA device) that behaves like the TensorRT 10 Python API where mimc
depends on it, so the build and profiling code is exercised on machines without a GPU.

Modelled after the real bindings (NVIDIA/TensorRT python/src/infer/pyCore.cpp, TensorRT 10.x):
- failures come back as return values, not exceptions: ``create_timing_cache`` -> None for an unreadable
  blob, ``set_timing_cache`` / ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` -> False,
  ``add_optimization_profile`` -> -1, ``build_serialized_network`` / ``deserialize_cuda_engine`` -> None;
  passing None where an object is expected raises TypeError (pybind11);
- one logger per process: a Builder or Runtime made while an earlier one is alive logs to the first
  logger it was given ("TensorRT maintains only a single logger pointer at any given time"); the fake
  keeps the first logger for the module's life, as if an earlier engine were still alive;
- the logger sees every severity, VERBOSE included (a real build emits thousands of tactic lines);
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists from TensorRT 10 (absent in the 8.x fake);
- parser errors print on several lines.
"""
from __future__ import annotations

import json
import types

import numpy as np

H100 = ("NVIDIA H100 80GB HBM3", "9.0")


class FakeDevice:
    """CUDA stand-in: a virtual clock that each enqueue advances by 1.5 ms per image."""

    def __init__(self, name=H100[0], cc=H100[1]):
        self.name, self.compute_capability, self.now, self.stream_handle, self.allocs = name, cc, 0.0, 7, []

    def alloc(self, nbytes):
        self.allocs.append(nbytes)
        return 1000 + len(self.allocs)

    def free(self):
        pass

    def event(self):
        return types.SimpleNamespace(t=None)

    def record(self, ev):
        ev.t = self.now

    def elapsed_ms(self, a, b):
        return b.t - a.t

    def synchronize(self):
        pass

    def mem_info(self):
        return (70 << 30, 80 << 30)


def fake_tensorrt(device: FakeDevice, calls: dict, picked=("fc2",), version="10.9.0", reject_profile=False,
                  parse_ok=True, enqueue_ok=True, output_dims=(-1, 64)):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    sev = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
    state = {"logger": None}

    def process_logger(logger):
        if state["logger"] is None:
            state["logger"] = logger
        return state["logger"]

    class ILogger:
        Severity = sev

        def __init__(self):
            pass

    class IProfiler:
        def __init__(self):
            pass

    trt.ILogger, trt.IProfiler = ILogger, IProfiler
    if int(version.split(".")[0]) >= 10:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    else:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.profiling_verbosity = [], [], None, None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, p):
            if reject_profile:
                return -1
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return None if bytes(data).startswith(b"CORRUPT") else Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache is None:
                raise TypeError("set_timing_cache(): incompatible function arguments")
            if cache.data.startswith(b"OTHER-GPU") and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = process_logger(logger)

        def create_network(self, flags):
            calls["network_flags"] = flags
            return types.SimpleNamespace()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["builder_flags"], calls["profiles"] = list(config.flags), [p.shapes for p in config.profiles]
            calls["verbosity"] = config.profiling_verbosity
            for i in range(200):
                self.logger.log(sev.VERBOSE, f"Tactic Name: sm90_xmma_gemm_{i} Tactic: 0x{i:016x} Time: 0.01")
            if "SPARSE_WEIGHTS" in config.flags:
                self.logger.log(sev.INFO, "(Sparsity) Layers eligible for sparse math: fc1, fc2")
                self.logger.log(sev.INFO, f"(Sparsity) TRT inference plan picked sparse implementation for layers: {', '.join(picked)}")
            return b"ENGINE-BYTES"

    class ParserError:
        def __str__(self):
            return "In node 3 with name: /blocks.0/attn/MatMul and operator: MatMul (parseNode):\nUNSUPPORTED_NODE: dtype"

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return ParserError()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.profiler = engine, {}, {}, None

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= 8:  # the fake engine's profile is 1..8
                return False
            self.shapes[name] = list(shape)
            return True

        def get_tensor_shape(self, name):
            b = self.shapes["pixel_values"][0]
            return [b, 3, 32, 32] if name == "pixel_values" else [b if i == 0 else d for i, d in enumerate(output_dims)]

        def set_tensor_address(self, name, ptr):
            calls.setdefault("addresses", set()).add(name)
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            # enqueueV3 fails (returns False) unless every I/O tensor has an address.
            if not enqueue_ok or set(self.addresses) != {"pixel_values", "pooled"}:
                state["logger"].log(sev.ERROR, "IExecutionContext::enqueueV3: Error Code 3: API Usage Error")
                return False
            device.now += 1.5 * self.shapes["pixel_values"][0]
            if self.profiler is not None:
                self.profiler.report_layer_time("fc1", 1.0)
                self.profiler.report_layer_time("fc2", 0.5)
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 12345

        def get_tensor_name(self, i):
            return ["pixel_values", "pooled"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "pixel_values" else "out"

        def get_tensor_shape(self, name):
            return [-1, 3, 32, 32] if name == "pixel_values" else list(output_dims)

        def get_tensor_dtype(self, name):
            return "float"

        def create_execution_context(self):
            return Context(self)

        def create_engine_inspector(self):
            layers = [{"Name": "fc1", "TacticName": "sm90_xmma_gemm"}, {"Name": "fc2", "TacticName": "sm90_xmma_sparse_gemm"}]
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": layers}))

    class Runtime:
        def __init__(self, logger):
            self.logger = process_logger(logger)

        def deserialize_cuda_engine(self, data):
            return Engine() if bytes(data) == b"ENGINE-BYTES" else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt
