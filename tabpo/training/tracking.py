"""Metrics over micro-batches and steps, throughput, and the ``metrics.jsonl`` log."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def combine(parts: Iterable[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Merge per-micro-batch metrics weighted by pair count (min/max taken as such)."""
    parts = list(parts)
    total = sum(w for w, _ in parts) or 1.0
    out: dict[str, float] = {}
    for key in parts[0][1] if parts else ():
        values = [m[key] for _, m in parts]
        if key.endswith("/min"):
            out[key] = min(values)
        elif key.endswith("/max"):
            out[key] = max(values)
        else:
            out[key] = sum(w * m[key] for w, m in parts) / total
    return out


class Throughput:
    """Optimizer steps and tokens per second since the last ``read``."""

    def __init__(self) -> None:
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        figures = {"it/s": self.steps / elapsed, "tok/s": self.tokens / elapsed}
        self.__init__()  # type: ignore[misc]
        return figures


class MetricsLog:
    """Append-only JSON lines; non-finite numbers are written as strings ("nan", "inf")."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
