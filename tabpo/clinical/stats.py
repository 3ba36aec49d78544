"""95% confidence intervals of the demo's metrics: a two-level percentile bootstrap.

Every model answers the same N test messages; a method trained with S seeds has counts of
shape (S, N, C), C columns of `evaluation.message_counts` laid out by `as_rows` (SFT, one
model: S = 1). Replicate r draws S seed indices k_1..k_S with replacement, then N message
indices with replacement (one message draw shared by the drawn seeds), and takes

    m_r = (1 / S) sum_j metric( sum_{n drawn} counts[k_j, n] )

where the metric is micro, computed from the summed counts exactly as `evaluation.py`
defines it. The interval is the 2.5th and 97.5th percentile of m_1..m_R (R = 2,000, drawn
from a fixed seed so a report is reproducible); the point estimate is the mean over seeds of
the metric on all messages, the number the table reports. With S = 1 only messages vary.

A paired difference a - b takes both sides from the same draws in every replicate: the same
messages, and seed k of a against seed k of b (the same data order). An interval that
excludes 0 is a difference these messages and seeds resolve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tabpo.clinical.evaluation import RATES, Counts

REPLICATES = 2000
SEED = 0
LEVEL = 0.95
F1_PARTS = ("tp", "fp", "fn")
RATE_PARTS = ("hit", "all")


def as_rows(counts: Counts) -> tuple[list[str], list[list[int]]]:
    """Per-message counts as named columns (``code/tp``, ..., ``json_valid/all``) and one row
    of integers per message: the compact form results.json keeps."""
    names = list(counts)
    columns = [f"{n}/{part}" for n in names for part in (RATE_PARTS if n in RATES else F1_PARTS)]
    messages = zip(*(counts[n] for n in names), strict=True)
    return columns, [[int(x) for per_metric in row for x in per_metric] for row in messages]


def metric(sums: np.ndarray, columns: Sequence[str], name: str) -> np.ndarray:
    """``name`` (``code/f1``, ``json_valid``...) from counts summed over messages: (..., C)
    -> (...). F1 = 2 TP / (2 TP + FP + FN), a rate = hits / total; 0 for 0 / 0."""
    at = {c: i for i, c in enumerate(columns)}
    base = name.removesuffix("/f1")
    parts = F1_PARTS if name.endswith("/f1") else RATE_PARTS
    missing = [f"{base}/{p}" for p in parts if f"{base}/{p}" not in at]
    if missing:
        raise ValueError(f"no counts for {name}: {', '.join(missing)} not among the columns")
    cols = [sums[..., at[f"{base}/{p}"]] for p in parts]
    num, den = (2 * cols[0], 2 * cols[0] + cols[1] + cols[2]) if parts == F1_PARTS else cols
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    value: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (for a difference: a real one)."""
        return self.low > 0 or self.high < 0


class Bootstrap:
    """Replicates of every model's metrics on one set of draws (module docstring)."""

    def __init__(
        self, counts: Mapping[str, np.ndarray], columns: Sequence[str], *,
        replicates: int = REPLICATES, seed: int = SEED, level: float = LEVEL,
    ) -> None:  # fmt: skip
        self.counts = {m: np.asarray(c, dtype=np.float64) for m, c in counts.items()}
        self.columns = list(columns)
        shapes = {m: c.shape for m, c in self.counts.items()}
        if any(len(s) != 3 or s[2] != len(self.columns) for s in shapes.values()):
            raise ValueError(f"counts must be (seeds, messages, {len(self.columns)}): {shapes}")
        n = {s[1] for s in shapes.values()}
        seeds = max(s[0] for s in shapes.values())
        if len(n) != 1 or any(s[0] not in (1, seeds) for s in shapes.values()):
            raise ValueError(f"every model needs the same messages and 1 or {seeds} seeds: "
                             f"{shapes}")  # fmt: skip
        self.messages = n.pop()
        self.tail = 50 * (1 - level)  # percent in each tail
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, seeds, size=(replicates, seeds))  # (R, S)
        drawn = rng.integers(0, self.messages, size=(replicates, self.messages))  # (R, N)
        flat = drawn + self.messages * np.arange(replicates)[:, None]
        # each message's multiplicity in each replicate: sums become one matrix product
        self.weights = np.bincount(flat.ravel(), minlength=replicates * self.messages)
        self.weights = self.weights.reshape(replicates, self.messages).astype(np.float64)
        self._sums: dict[str, np.ndarray] = {}

    def sums(self, model: str) -> np.ndarray:
        """Counts summed over each replicate's messages, for each drawn seed: (R, S, C)."""
        if model not in self._sums:
            c = self.counts[model]  # (S, N, C)
            s, n, k = c.shape
            per_seed = (self.weights @ c.transpose(1, 0, 2).reshape(n, s * k)).reshape(-1, s, k)
            self._sums[model] = per_seed if s == 1 else np.take_along_axis(
                per_seed, self.seeds[..., None], axis=1)  # fmt: skip
        return self._sums[model]

    def replicates(self, model: str, name: str) -> np.ndarray:
        """m_1..m_R: the mean over the drawn seeds of the metric on the drawn messages."""
        return metric(self.sums(model), self.columns, name).mean(axis=1)

    def point(self, model: str, name: str) -> float:
        """The mean over seeds of the metric on all messages."""
        return float(metric(self.counts[model].sum(axis=1), self.columns, name).mean())

    def interval(self, model: str, name: str) -> Interval:
        return self._interval(self.point(model, name), self.replicates(model, name))

    def difference(self, a: str, b: str, name: str) -> Interval:
        """a - b, both sides on the same draws in every replicate."""
        paired = self.replicates(a, name) - self.replicates(b, name)
        return self._interval(self.point(a, name) - self.point(b, name), paired)

    def _interval(self, value: float, replicates: np.ndarray) -> Interval:
        low, high = np.percentile(replicates, [self.tail, 100 - self.tail])
        return Interval(value, float(low), float(high))
