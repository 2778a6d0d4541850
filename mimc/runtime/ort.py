"""Timing ONNX graphs on ONNX Runtime's CPU provider: one batch size in a worker process, or several graphs interleaved.

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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mimc.errors import BadInputError, MimcError
from mimc.runtime.session import make_session

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


# Measurement (worker process) --------------------------------------------------------------------
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


def synthetic_feed(specs: list[dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded normal values for float inputs, zeros for the others, at each spec's shape."""
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        dtype = DTYPES[s["dtype"]]
        if np.issubdtype(dtype, np.floating):
            feed[s["name"]] = rng.standard_normal(s["shape"]).astype(dtype)
        else:
            feed[s["name"]] = np.zeros(s["shape"], dtype=dtype)
    return feed


def time_runs(load: Callable[[], Any], run: Callable[[Any], Callable[[dict], Any]], specs: list[dict[str, Any]],
              warmup: int, iters: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(what ``load()`` gave, its timed runs): ``load`` is timed, then ``run(loaded)(feed)`` on
    :func:`synthetic_feed` inputs is warmed up and timed ``iters`` times; also this process's memory."""
    feed = synthetic_feed(specs, seed)
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


def measure(path: str, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int,
            seed: int = 0) -> dict[str, Any]:
    """One batch size, in this process: session, warm-up, timed runs, memory."""
    return time_runs(lambda: make_session(path, threads=threads), run_outputs, specs, warmup, iters, seed)[1]


def run_outputs(sess) -> Callable[[dict], Any]:
    """``sess.run`` of every output, as a call on a feed."""
    return partial(sess.run, [o.name for o in sess.get_outputs()])


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


def time_interleaved(paths: Sequence[str | Path], iters: int = 20, threads: int | None = None, rounds: int = 4,
                     warmup: int = 3) -> list[float]:
    """Median batch latency (ms) of several graphs timed together: one warmed session each, timed in
    alternating rounds (forward, then reverse order), so load on a shared machine hits all alike.
    For comparisons (speed-ups); :func:`profile_onnx_cpu` gives one graph's full report."""
    return interleave([runner(path, threads, warmup) for path in paths], iters=iters, rounds=rounds)


def runner(path: str | Path, threads: int | None = None, warmup: int = 3) -> Callable[[], Any]:
    """One batch-1 inference of ``path`` on a warmed ORT CPU session, as a call (for :func:`interleave`)."""
    threads = threads or os.cpu_count() or 1
    sess = make_session(path, threads=threads)  # the CPU provider
    return warmed(run_outputs(sess), sess.get_inputs(), warmup)


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


__all__ = ["measure", "run_worker", "time_interleaved", "runner", "warmed", "interleave", "host_info", "DTYPES",
           "synthetic_feed", "time_runs", "run_outputs", "worker_main", "proc_field"]


if __name__ == "__main__":
    raise SystemExit(worker_main(measure, sys.argv[1:]))
