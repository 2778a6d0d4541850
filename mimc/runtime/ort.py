"""Measured latency, throughput and peak memory of an ONNX graph on ONNX Runtime's CPU provider.

Each batch size is measured in its own short-lived worker process (``python -m mimc.runtime.ort``)
that imports only ONNX Runtime and numpy - not torch, not the CLI. So its peak resident memory
(VmHWM from /proc/self/status; ``ru_maxrss`` where /proc is missing) is what a minimal deployment
process needs for that graph and batch, free of whatever the calling process holds; the report
also gives the part the session added (peak minus the RSS measured just before the session was
created). Timing: warm-up runs, then ``iters`` runs each timed with ``perf_counter``; percentiles
from numpy. Worker threads do not spin between runs (``session.intra_op.allow_spinning`` = 0), so a
measurement does not steal cores from its neighbours on a shared machine.

References:
- ONNX Runtime performance tuning, thread management and session options:
  https://onnxruntime.ai/docs/performance/tune-performance/threading.html (microsoft/onnxruntime)
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mimc.errors import BadInputError, MimcError

MEMORY_METHOD = (
    "peak RSS (VmHWM) of a fresh worker process per batch size that loads only onnxruntime + numpy; "
    "session_mb = peak minus the RSS just before the session was created"
)
# ORT's type strings -> numpy dtypes for the synthetic inputs.
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}
_ONNX_ELEM = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)",
              6: "tensor(int32)", 2: "tensor(uint8)", 3: "tensor(int8)", 9: "tensor(bool)"}


# Graph inspection (parent process) ---------------------------------------------------------------
def _read_model(onnx_path: str | Path):
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/ValueError/OSError for a non-ONNX file
        raise BadInputError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}): pass a .onnx file written by `mimc export`") from exc


def graph_inputs(onnx_path: str | Path, model=None) -> list[dict[str, Any]]:
    """Name, dtype and shape (int, or None for a symbolic axis) of every real graph input
    (``model``: the already loaded ModelProto of ``onnx_path``, to read the file once)."""
    model = model if model is not None else _read_model(onnx_path)
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append({"name": value.name, "dtype": _ONNX_ELEM.get(t.elem_type, f"elem_type {t.elem_type}"), "shape": dims})
    if not out:
        raise BadInputError(f"{onnx_path} has no inputs to feed: pass a graph with an input such as pixel_values")
    return out


def input_specs(inputs: list[dict[str, Any]], batch: int, path: str | Path) -> list[dict[str, Any]]:
    """Concrete shapes for ``batch``; refuses a static batch that differs or other symbolic axes."""
    specs = []
    for inp in inputs:
        shape = list(inp["shape"])
        if not shape:
            raise BadInputError(f"input '{inp['name']}' of {path} is a scalar: profile a graph with batched inputs")
        if shape[0] is None or shape[0] == 0:
            shape[0] = batch
        elif shape[0] != batch:
            raise BadInputError(
                f"{path} has a static batch of {shape[0]}: profile it with batch_sizes {shape[0]} or re-export with batch dynamic",
                option="batch_sizes",
            )
        if any(d is None or d == 0 for d in shape[1:]):
            raise BadInputError(f"input '{inp['name']}' of {path} has symbolic axes beyond the batch {inp['shape']}: export with static image size")
        if inp["dtype"] not in _DTYPES:
            raise BadInputError(f"input '{inp['name']}' of {path} has unsupported type {inp['dtype']}: profile a float graph")
        specs.append({"name": inp["name"], "dtype": inp["dtype"], "shape": shape})
    return specs


def layout_note(model) -> str | None:
    """A Q/DQ graph quantized for TensorRT runs on ONNX Runtime CPU only as an emulation: say so."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        target = json.loads(meta.get("mimc_quantization", "{}")).get("target")
    except json.JSONDecodeError:
        return None
    if target == "tensorrt":
        return ("this graph's Q/DQ layout is built for TensorRT: ONNX Runtime CPU runs it as an emulation, so this is not "
                "int8 CPU latency; for that, quantize for the cpu target")
    return None


def static_batch(inputs: list[dict[str, Any]]) -> int | None:
    """The graph's fixed batch size, or None when the batch axis is dynamic."""
    first = inputs[0]["shape"][0] if inputs[0]["shape"] else None
    return first or None


# Measurement (worker process) --------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:  # no /proc (macOS): ru_maxrss is bytes there, kB on Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return kb / 1024


def measure(path: str, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """One batch size, in this process: session, warm-up, timed runs, memory."""
    from mimc.deploy.validate import make_session

    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        dtype = _DTYPES[s["dtype"]]
        if np.issubdtype(dtype, np.floating):
            feed[s["name"]] = rng.standard_normal(s["shape"]).astype(dtype)
        else:
            feed[s["name"]] = np.zeros(s["shape"], dtype=dtype)
    rss_before = _rss_mb()
    start = time.perf_counter()
    sess = make_session(path, providers=["CPUExecutionProvider"], threads=threads)
    load_s = time.perf_counter() - start
    names = [o.name for o in sess.get_outputs()]
    for _ in range(warmup):
        sess.run(names, feed)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        sess.run(names, feed)
        times[i] = time.perf_counter() - t0
    peak = _peak_rss_mb()
    batch = specs[0]["shape"][0]
    ms = times * 1e3
    return {
        "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        # Items per second over the timed runs (batch / mean latency): what a saturated server sees.
        "throughput_items_s": float(batch / times.mean()),
        "peak_rss_mb": round(peak, 1),
        "session_mb": round(peak - rss_before, 1) if rss_before is not None else None,
        "session_load_s": round(load_s, 3),
    }


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m mimc.runtime.ort '<json>'``: measure one batch size, print one JSON line."""
    args = json.loads(argv[0])
    try:
        result = measure(args["path"], args["specs"], args["warmup"], args["iters"], args["threads"], args.get("seed", 0))
    except MimcError as exc:
        print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}))
        return 0
    print(json.dumps(result))
    return 0


def _run_worker(path: Path, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int) -> dict[str, Any]:
    payload = json.dumps({"path": str(path), "specs": specs, "warmup": warmup, "iters": iters, "threads": threads})
    env = dict(os.environ)
    # The worker must import this mimc even when it is not installed (a source checkout).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "mimc.runtime.ort", payload], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MimcError(f"profiling worker failed for {path} at batch {specs[0]['shape'][0]} ({tail[:300]}): check the graph runs with `mimc eval`")
    result = json.loads(lines[-1])
    if "error" in result:
        error = BadInputError if result.get("exit_code") == 2 else MimcError
        raise error(result["error"])
    return result


def time_interleaved(paths: Sequence[str | Path], iters: int = 20, threads: int | None = None, rounds: int = 4,
                     warmup: int = 3) -> list[float]:
    """Median batch latency (ms) of several graphs timed together: one warmed session each, timed in
    alternating rounds (forward, then reverse order), so load on a shared machine hits all alike.
    For comparisons (speed-ups); :func:`profile_onnx_cpu` gives one graph's full report."""
    from mimc.deploy.validate import make_session

    threads = threads or os.cpu_count() or 1
    runs = []
    for path in paths:
        sess = make_session(path, providers=["CPUExecutionProvider"], threads=threads)
        feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
                for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        for _ in range(warmup):
            sess.run(names, feed)
        runs.append((sess, feed, names, []))
    per_round = max(1, -(-iters // rounds))
    for r in range(rounds):
        for sess, feed, names, times in (runs if r % 2 == 0 else runs[::-1]):
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(names, feed)
                times.append(time.perf_counter() - t0)
    return [round(float(np.median(times)) * 1e3, 4) for _, _, _, times in runs]


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def profile_onnx_cpu(onnx_path: str | Path, batch_sizes: Sequence[int] | None = None, warmup: int = 10, iters: int = 50,
                     threads: int | None = None, on_batch=None) -> dict[str, Any]:
    """Measure ``onnx_path`` on ORT CPU for each batch size; returns a report labelled "measured".

    ``batch_sizes`` None: the graph's static batch, or 1 when it is dynamic. ``on_batch(batch)`` is
    called before each measurement (progress display).
    """
    from mimc.artifact import sha256_file
    from mimc.deploy.validate import onnxruntime, onnxruntime_distribution

    path = Path(onnx_path)
    ort = onnxruntime()
    if warmup < 0 or iters < 1:
        raise BadInputError(f"warmup must be >= 0 and iters >= 1, got {warmup} and {iters}: e.g. warmup 10, iters 50", option=("warmup", "iters"))
    model = _read_model(path)
    inputs = graph_inputs(path, model)
    note = layout_note(model)
    del model  # the workers load the graph themselves
    fixed = static_batch(inputs)
    batch_sizes = list(batch_sizes) if batch_sizes else [fixed or 1]
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise BadInputError(f"batch_sizes must be positive integers, got {batch_sizes}: e.g. 1 and 8", option="batch_sizes")
    plans = [input_specs(inputs, b, path) for b in batch_sizes]  # refuse before measuring anything
    threads = int(threads) if threads else (os.cpu_count() or 1)
    if threads < 1:
        raise BadInputError(f"threads must be >= 1, got {threads}: e.g. threads 2", option="threads")
    results = []
    for b, specs in zip(batch_sizes, plans):
        if on_batch is not None:
            on_batch(b)
        results.append(_run_worker(path, specs, warmup, iters, threads))
    return {
        "label": "measured",
        "model": str(path),
        "model_sha256": sha256_file(path),
        "model_bytes": path.stat().st_size,
        "backend": "onnxruntime-cpu",
        "provider": "CPUExecutionProvider",
        "onnxruntime_version": ort.__version__,
        "onnxruntime_distribution": onnxruntime_distribution(),
        "threads": threads,
        "session_options": {"session.intra_op.allow_spinning": "0", "inter_op_num_threads": 1, "execution_mode": "sequential"},
        "warmup": warmup,
        "iters": iters,
        "inputs": {i["name"]: {"dtype": i["dtype"], "shape": i["shape"]} for i in inputs},
        "memory_method": MEMORY_METHOD,
        "host": host_info(),
        "results": results,
        **({"note": note} if note else {}),
    }


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
