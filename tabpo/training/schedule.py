"""Learning-rate schedules: linear warmup, then linear or cosine decay to 0 (HF's shapes).

Step t counts optimizer steps from 0; as in Hugging Face's schedulers the first warmup step
uses lr 0, so a run with warmup W reaches the peak at step W.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps(total_steps: int, warmup_ratio: float, warmup: int | None = None) -> int:
    """``warmup`` when given, else ``ceil(warmup_ratio * total_steps)`` (HF's rule)."""
    return warmup if warmup is not None else math.ceil(warmup_ratio * total_steps)


def learning_rate(step: int, *, base: float, total: int, warmup: int, kind: str) -> float:
    """lr at optimizer step ``step`` of ``total``.

    t < W:   base * t / W
    linear:  base * max(0, (N - t) / (N - W))
    cosine:  base * 0.5 * (1 + cos(pi * (t - W) / (N - W)))
    """
    if step < warmup:
        return base * step / max(1, warmup)
    if kind == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
