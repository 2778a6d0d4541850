"""Learning-rate and annealing schedules as pure functions of the step (so resuming is exact)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup`` steps, then cosine decay to ``final``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` at the last step, linear in between."""
    if total <= 1:
        return end
    return start + (end - start) * min(1.0, step / (total - 1))
