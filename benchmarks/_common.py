"""Helpers the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this imports as `_common`)."""
from __future__ import annotations

import resource
from pathlib import Path


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session with mimc's settings: spinning off, sequential (DESIGN.md timing rules)."""
    from mimc.runtime.session import make_session

    return make_session(path, threads=threads)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): fairer than wall time on a loaded machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
