"""Timing ONNX graphs on ONNX Runtime's CPU provider: one batch size in a worker process, or several graphs interleaved.

The worker (``python -m mimc.runtime.ort``) and the measurement are :mod:`mimc.runtime.timing`'s, shared
with OpenVINO; sessions get :func:`mimc.runtime.session.session_options` (no spinning threads).

References:
- ONNX Runtime performance tuning, thread management and session options:
  https://onnxruntime.ai/docs/performance/tune-performance/threading.html (microsoft/onnxruntime)
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

from mimc.runtime.session import make_session
from mimc.runtime.timing import time_runs, warmed, worker_main


# Measurement (worker process) --------------------------------------------------------------------
def measure(path: str, specs: list[dict[str, Any]], warmup: int, iters: int, threads: int) -> dict[str, Any]:
    """One batch size, in this process: session, warm-up, timed runs, memory."""
    return time_runs(lambda: make_session(path, threads=threads), run_outputs, specs, warmup, iters)[1]


def run_outputs(sess) -> Callable[[dict], Any]:
    """``sess.run`` of every output, as a call on a feed."""
    return partial(sess.run, [o.name for o in sess.get_outputs()])


def runner(path: str | Path, threads: int | None = None, warmup: int = 3) -> Callable[[], Any]:
    """One batch-1 inference of ``path`` on a warmed ORT CPU session, as a call (for
    :func:`mimc.runtime.timing.interleave`)."""
    threads = threads or os.cpu_count() or 1
    sess = make_session(path, threads=threads)  # the CPU provider
    return warmed(run_outputs(sess), sess.get_inputs(), warmup)


__all__ = ["measure", "run_outputs", "runner"]


if __name__ == "__main__":
    raise SystemExit(worker_main(measure, sys.argv[1:]))
