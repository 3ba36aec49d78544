"""The demo's figure: who wins on which field, from the picture alone.

One panel per metric (Code, Sub-code, relaxed Span and strict triplet F1, JSON validity,
verbatim spans): each model's point estimate with its 95% interval, the best marked with a
star; one panel of TAB-PO's paired differences against every other model, filled where the
interval excludes 0; and the chosen answers' log-prob over training (likelihood squeezing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabpo.clinical.demo import DemoResult
from tabpo.clinical.report import FOCUS, LABELS, MAIN, Estimates, estimate, name
from tabpo.clinical.stats import Interval


def figure(result: DemoResult, path: Path, e: Estimates | None = None) -> None:
    """Write the figure (module docstring) as a PNG; ``e``: the result's estimates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = e or estimate(result)
    models = list(e.models)
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    fig = plt.figure(figsize=(15, 11))
    grid = fig.add_gridspec(3, 3)
    for k, metric in enumerate(MAIN):
        intervals(fig.add_subplot(grid[k // 3, k % 3]), e, metric, colors)
    paired(fig.add_subplot(grid[2, :2]), e, colors)
    chosen(fig.add_subplot(grid[2, 2]), result, colors)
    split = result.settings.get("eval_split", "test")
    fig.suptitle(f"{split} split ({'held-out' if split == 'test' else 'preference'} phrasings), "
                 f"{e.messages} messages, {e.seeds} seed{'s' * (e.seeds > 1)}; 95% bootstrap "
                 "intervals")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def intervals(ax: Any, e: Estimates, metric: str, colors: dict[str, str]) -> None:
    """Each model's estimate and interval; a star on the best when it is alone at the top."""
    models = list(e.models)
    found = [e.models[m][metric] for m in models]
    values = sorted((i.value for i in found), reverse=True)
    best = max(range(len(models)), key=lambda j: found[j].value)
    alone = len(values) == 1 or values[0] > values[1]
    for j, (m, i) in enumerate(zip(models, found, strict=True)):
        star = alone and j == best
        ax.errorbar(j, i.value, yerr=whiskers(i), capsize=4,
                    fmt="*" if star else "o", ms=16 if star else 7, color=colors[m],
                    mec="black" if star else colors[m])  # fmt: skip
    ax.set_xticks(range(len(models)), [name(m) for m in models], fontsize=8, rotation=30)
    if alone:
        ax.get_xticklabels()[best].set_fontweight("bold")
    ax.set_title(f"{LABELS[metric]}: best {name(models[best])}" if alone else
                 f"{LABELS[metric]}: a tie at the top", fontsize=10)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)


def paired(ax: Any, e: Estimates, colors: dict[str, str]) -> None:
    """TAB-PO minus each model, one row per metric, with a zero line."""
    others = list(e.differences)
    ax.axvline(0.0, color="black", lw=1)
    if not others:
        ax.set_title(f"no {name(FOCUS)} run to compare", fontsize=10)
        return
    width = 0.7 / len(others)
    for row, metric in enumerate(MAIN):
        for j, other in enumerate(others):
            d = e.differences[other][metric]
            y = row - 0.35 + width * (j + 0.5)
            ax.errorbar(d.value, y, xerr=whiskers(d), fmt="o",
                        capsize=3, color=colors[other],
                        mfc=colors[other] if d.resolved else "white",
                        label=f"{name(FOCUS)} − {name(other)}" if row == 0 else None)  # fmt: skip
    ax.set_yticks(range(len(MAIN)), [LABELS[m] for m in MAIN], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (right of 0: TAB-PO higher)")
    ax.set_title(f"{name(FOCUS)} minus each model, paired 95% intervals (filled: excludes 0, "
                 "a real difference)", fontsize=10)  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(others), 6))


def whiskers(i: Interval) -> list[list[float]]:
    """matplotlib's error bar lengths (a percentile interval may miss its point estimate
    by a hair at the edges: no negative length)."""
    return [[max(i.value - i.low, 0.0)], [max(i.high - i.value, 0.0)]]


def chosen(ax: Any, result: DemoResult, colors: dict[str, str]) -> None:
    """The chosen log-prob over training, a running mean over 10 steps (each step sees
    other pairs)."""
    for method, curve in result.curves.items():
        if curve:
            ys = [y for _, y in curve]
            smooth = [sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1])
                      for i in range(len(ys))]  # fmt: skip
            ax.plot([x for x, _ in curve], smooth, label=name(method),
                    color=colors.get(method))  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("log p(chosen), sequence sum, mean of 10 steps", fontsize=8)
    ax.set_title("chosen log-prob in training (squeezing = falling)", fontsize=10)
    if result.curves:
        ax.legend(fontsize=8)
