"""Metrics over micro-batches and steps, throughput, and the ``metrics.jsonl`` log."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from tabpo.common.errors import TabpoError
from tabpo.common.files import write_text


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
    """Optimizer steps and tokens per second since the last ``read`` and, with several
    processes, the seconds per step spent in collectives (``comm_s``)."""

    def __init__(self) -> None:
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0
        self.comm = 0.0

    def add(self, tokens: int, comm_seconds: float = 0.0) -> None:
        self.steps += 1
        self.tokens += tokens
        self.comm += comm_seconds

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        figures = {"it/s": self.steps / elapsed, "tok/s": self.tokens / elapsed}
        if self.comm:
            figures["comm_s"] = self.comm / max(self.steps, 1)
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
    """Append-only JSON lines; non-finite numbers are written as strings ("nan", "inf").
    Each record goes to the ``reporters`` (``--report-to``) too."""

    def __init__(self, path: Path, reporters: list[Reporter] | None = None) -> None:
        self.path, self.reporters = path, reporters or []

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        for reporter in self.reporters:
            reporter.log(record)

    def truncate(self, step: int) -> None:
        """Keep only the lines of steps up to ``step``: a run resumed from the checkpoint of
        ``step`` writes the later steps again, and each step must appear once. A line cut
        short by a crash goes too. Rewritten atomically."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if _step_of(line) <= step]  # fmt: skip
        write_text(self.path, "".join(kept))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Reporter(Protocol):
    """Where the records of metrics.jsonl also go (``--report-to``)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# --report-to name -> (the package it needs, what it writes in the output directory)
LOGGERS = {"tensorboard": ("tensorboardX", "runs"), "wandb": ("wandb", "wandb")}
OUTPUTS = {name: written for name, (_, written) in LOGGERS.items()}


def check_reporters(names: list[str]) -> None:
    """A one-line error now, before any model loads, for a logger that is not installed."""
    for name in names:
        module = LOGGERS[name][0]
        if importlib.util.find_spec(module) is None:
            raise TabpoError(f"--report-to {name} needs the {module} package: pip install {module}")


def open_reporters(names: list[str], output: Path, config: dict[str, Any]) -> list[Reporter]:
    return [TensorBoard(output / OUTPUTS[n]) if n == "tensorboard" else WandB(output, config)
            for n in names]  # fmt: skip


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, under their metrics.jsonl names (the step aside)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


class TensorBoard:
    """TensorBoard event files (tensorboardX's writer): one scalar per metric and step."""

    def __init__(self, directory: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(directory))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (its own client; ``WANDB_MODE=offline`` needs no network),
    named after the output directory, in ``WANDB_PROJECT`` (default "tabpo")."""

    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT", "tabpo")
        self.run = wandb.init(project=project, name=output.resolve().name, dir=str(output),
                              config=config)  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
