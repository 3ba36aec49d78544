"""The demo's report: ``report.md`` (the F1 table, mean and spread over seeds), ``results.json``
and ``figure.png`` (F1 bars, and the chosen log-prob over training)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from tabpo.clinical.demo import HEADLINE, DemoResult, summary

LABELS = {"code/f1": "Code F1", "subcode/f1": "Sub-code F1", "span/f1": "Span F1 (relaxed)",
          "triplet/f1": "strict triplet F1", "json_valid": "JSON valid",
          "span_verbatim": "verbatim spans", "snap_span/f1": "Span F1 snapped",
          "snap_triplet/f1": "strict F1 snapped"}  # fmt: skip
NAMES = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "cal_dpo": "Cal-DPO",
         "dpop": "DPOP", "tabpo": "TAB-PO"}  # fmt: skip


def table(result: DemoResult) -> str:
    """A Markdown table: one row per method, mean +- std over seeds for each metric."""
    stats = summary(result)
    seeds = max(len(v) for v in result.scores.values())
    keys = [k for k in HEADLINE if all(k in m for m in stats.values())]
    head = "| method | " + " | ".join(LABELS[k] for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = []
    for method, metrics in stats.items():
        cells = [f"{m:.3f}" + (f" ± {sd:.3f}" if seeds > 1 else "") for m, sd in
                 (metrics[k] for k in keys)]  # fmt: skip
        rows.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def mean_f1(result: DemoResult, method: str) -> float:
    """The paper's headline: the mean of Code, Sub-code and Span micro-F1."""
    stats = summary(result)[method]
    return sum(stats[k][0] for k in ("code/f1", "subcode/f1", "span/f1")) / 3


def write(result: DemoResult, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    figure(result, out / "figure.png")
    sft = mean_f1(result, "sft")
    lines = [
        "# tabpo demo: SFT vs preference methods on the synthetic clinical-message benchmark",
        "",
        f"Command: `{command}`",
        "",
        table(result),
        "",
        "Mean of Code / Sub-code / Span micro-F1, relative to SFT: "
        + ", ".join(
            f"{NAMES.get(m, m)} {100 * (mean_f1(result, m) / max(sft, 1e-9) - 1):+.1f}%"
            for m in result.scores
            if m != "sft"
        ),  # fmt: skip
        "",
        "Pairs: " + ", ".join(f"{k} {v}" for k, v in result.pair_stats.items()),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()),
        "",
        f"Time: {sum(result.seconds.values()):.0f} s in the stages below (wall clock, "
        f"{os.cpu_count()} CPUs; other work on the machine slows it): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()),
        "",
        "![F1 and chosen log-prob](figure.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def figure(result: DemoResult, path: Path) -> None:
    """Left: F1 per metric and method; right: chosen log-prob over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(result)
    metrics = ["code/f1", "subcode/f1", "span/f1", "triplet/f1"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(stats), 1)
    for i, (method, values) in enumerate(stats.items()):
        xs = [j + i * width for j in range(len(metrics))]
        bars.bar(xs, [values[k][0] for k in metrics], width, yerr=[values[k][1] for k in
                 metrics], label=NAMES.get(method, method))  # fmt: skip
    bars.set_xticks([j + width * (len(stats) - 1) / 2 for j in range(len(metrics))])
    bars.set_xticklabels([LABELS[k] for k in metrics], fontsize=8)
    bars.set_ylim(0, 1)
    split = result.settings.get("eval_split", "test")
    bars.set_title(f"{split} split ({'held-out' if split == 'test' else 'preference'} phrasings)")
    bars.legend(fontsize=8)
    for method, curve in result.curves.items():
        if curve:  # a running mean over 10 steps: each step sees other pairs
            ys = [y for _, y in curve]
            smooth = [sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1])
                      for i in range(len(ys))]  # fmt: skip
            curves.plot([x for x, _ in curve], smooth, label=NAMES.get(method, method))
    curves.set_xlabel("step")
    curves.set_ylabel("log p(chosen), sequence sum, mean of 10 steps")
    curves.set_title("chosen log-prob during training (squeezing = falling)")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
