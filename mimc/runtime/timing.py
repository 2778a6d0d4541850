"""Measuring any runtime the same way: synthetic inputs, timed runs, process memory, worker processes,
and interleaved timing of several warmed calls.

The runtime modules (:mod:`mimc.runtime.ort`, :mod:`mimc.runtime.openvino`) give their own load and
run steps; everything else about a measurement is here, so both report the same keys computed the
same way. A worker process (``python -m <runtime module> '<json>'``) imports only its runtime and
numpy - not torch, not the CLI - so its peak resident memory (VmHWM from /proc/self/status;
``ru_maxrss`` where /proc is missing) is what a minimal deployment process needs for that graph and
batch; the report also gives the part the session added (peak minus the RSS just before loading).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mimc.errors import BadInputError, ConfigError, MimcError, whole

# ORT's type strings -> numpy dtypes for the synthetic inputs.
DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def check_threads(threads: int | None) -> None:
    """Refuse a thread count below 1 or above the cores this process may use (100000 ONNX Runtime
    threads exhausted the machine's processes)."""
    if threads is None:
        return
    cores = cores_here()
    if not whole(threads) or threads < 1:
        raise ConfigError(f"threads must be 1 or more, got {threads!r}", option="threads")
    if threads > cores:
        raise ConfigError(f"threads {threads} is more than the {cores} cores here: choose at most {cores}", option="threads")


def cores_here() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def proc_field(file: str, field: str) -> str | None:
    """The value of the first line of a /proc file that starts with ``field``; None without /proc."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status in MB; None without /proc."""
    value = proc_field("/proc/self/status", field + ":")
    return None if value is None else int(value.split()[0]) / 1024


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:  # no /proc (macOS): ru_maxrss is bytes there, kB on Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return peak


def synthetic_feed(specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Seeded normal values for float inputs, zeros for the others, at each spec's shape."""
    rng = np.random.default_rng(0)
    feed = {}
    for s in specs:
        dtype = DTYPES[s["dtype"]]
        if np.issubdtype(dtype, np.floating):
            feed[s["name"]] = rng.standard_normal(s["shape"]).astype(dtype)
        else:
            feed[s["name"]] = np.zeros(s["shape"], dtype=dtype)
    return feed


def time_runs(load: Callable[[], Any], run: Callable[[Any], Callable[[dict], Any]], specs: list[dict[str, Any]],
              warmup: int, iters: int) -> tuple[Any, dict[str, Any]]:
    """(what ``load()`` gave, its timed runs): ``load`` is timed, then ``run(loaded)(feed)`` on
    :func:`synthetic_feed` inputs is warmed up and timed ``iters`` times; also this process's memory."""
    feed = synthetic_feed(specs)
    rss_before = _status_mb("VmRSS")
    start = time.perf_counter()
    loaded = load()
    load_s = time.perf_counter() - start
    call = run(loaded)
    for _ in range(warmup):
        call(feed)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        call(feed)
        times[i] = time.perf_counter() - t0
    peak = _peak_rss_mb()
    ms = times * 1e3
    batch = specs[0]["shape"][0]
    return loaded, {
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


def worker_main(measure: Callable[..., dict[str, Any]], argv: Sequence[str]) -> int:
    """``python -m <runtime module> '<json>'``: ``measure`` one batch size (the JSON holds its
    arguments), print one JSON line: the result, or the error a MimcError gave."""
    try:
        result = measure(**json.loads(argv[0]))
    except MimcError as exc:
        result = {"error": str(exc), "exit_code": exc.exit_code}
    print(json.dumps(result))
    return 0


def run_worker(path: Path, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int,
               module: str = "mimc.runtime.ort", **extra: Any) -> dict[str, Any]:
    """Measure one batch size in a fresh ``python -m <module>`` worker (ORT here, or
    :mod:`mimc.runtime.openvino`); ``extra`` goes into the worker's JSON arguments."""
    payload = json.dumps({"path": str(path), "specs": specs, "warmup": warmup, "iters": iters, "threads": threads, **extra})
    env = dict(os.environ)
    # The worker must import this mimc even when it is not installed (a source checkout).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", module, payload], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MimcError(f"profiling worker failed for {path} at batch {specs[0]['shape'][0]} ({tail[:300]}): check the graph runs with `mimc eval`")
    result = json.loads(lines[-1])
    if "error" in result:
        error = BadInputError if result.get("exit_code") == 2 else MimcError
        raise error(result["error"])
    return result


def warmed(run: Callable[[dict], Any], ports: Iterable[Any], warmup: int) -> Callable[[], Any]:
    """``run(feed)`` on seeded normal float32 inputs for ``ports`` (symbolic axes as 1), warmed up, as a call."""
    feed = {p.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in p.shape])
            .astype(np.float32) for p in ports}
    for _ in range(warmup):
        run(feed)
    return lambda: run(feed)


def interleave(runs: Sequence[Callable[[], Any]], iters: int = 20, rounds: int = 4) -> list[float]:
    """Median latency (ms) of each warmed call, timed in alternating rounds (forward, then reverse
    order) of ``ceil(iters / rounds)`` runs each: whatever the runtime behind each call (ORT
    sessions, OpenVINO compiled models), all of them in this one process, a load spike hits all alike."""
    times: list[list[float]] = [[] for _ in runs]
    per_round = max(1, -(-iters // rounds))
    order = list(range(len(runs)))
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            for _ in range(per_round):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    return [round(float(np.median(t)) * 1e3, 4) for t in times]


def host_info() -> dict[str, Any]:
    model_name = proc_field("/proc/cpuinfo", "model name")
    cpu = model_name if model_name is not None else platform.processor() or platform.machine()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def latency_row(samples_ms: list[float], batch: int) -> dict[str, Any]:
    """One batch size's GPU timings: percentiles under ``latency_ms``, and the same numbers under the
    flat keys `mimc profile`'s CPU reports use, so one table prints both."""
    if not samples_ms:
        raise MimcError("no timing samples were taken: pass iters >= 1")
    s = sorted(samples_ms)
    p50, p90, p99 = (float(v) for v in np.percentile(s, [50, 90, 99]))
    stats = {"p50": p50, "p90": p90, "p99": p99, "mean": sum(s) / len(s), "min": s[0], "max": s[-1]}
    return {"batch": batch, "latency_ms": stats, "throughput_per_s": batch * 1e3 / stats["p50"],
            "p50_ms": stats["p50"], "p90_ms": stats["p90"], "p99_ms": stats["p99"], "mean_ms": stats["mean"],
            "throughput_items_s": batch * 1e3 / stats["p50"]}



__all__ = ["latency_row", "DTYPES", "proc_field", "synthetic_feed", "time_runs", "worker_main", "run_worker", "warmed", "interleave",
           "host_info"]
