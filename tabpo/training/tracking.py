"""Metrics over micro-batches and steps, throughput, and the ``metrics.jsonl`` log."""

from __future__ import annotations

import json
import math
import os
import sys
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


METRICS_FILE = "metrics.jsonl"


def peak_rss_gb() -> float:
    """The process's peak resident set size in GB (what `/usr/bin/time -v` reports), the
    same measure for every backend and every tool the benchmark compares."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes vs KiB


class MetricsLog:
    """Append-only JSON lines; non-finite numbers are written as strings ("nan", "inf")."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only the lines of steps up to ``step``: a run resumed from the checkpoint of
        ``step`` writes the later steps again, and each step must appear once. A line cut
        short by a crash goes too. Rewritten atomically."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if _step_of(line) <= step]  # fmt: skip
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
