"""The demo's report: ``report.md`` (each metric with its 95% interval, TAB-PO's paired
differences and what they say), ``results.json`` (everything, the per-message counts
included, so a report is recomputed from it alone) and ``figure.png`` (``figure.py``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tabpo.clinical.demo import HEADLINE, DemoResult
from tabpo.clinical.stats import LEVEL, REPLICATES, SEED, Bootstrap, Interval

LABELS = {"code/f1": "Code F1", "subcode/f1": "Sub-code F1", "span/f1": "Span F1 (relaxed)",
          "triplet/f1": "strict triplet F1", "json_valid": "JSON valid",
          "span_verbatim": "verbatim spans", "snap_span/f1": "Span F1 snapped",
          "snap_triplet/f1": "strict F1 snapped"}  # fmt: skip
NAMES = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "cal_dpo": "Cal-DPO",
         "dpop": "DPOP", "tabpo": "TAB-PO"}  # fmt: skip
FOCUS = "tabpo"  # the method every other model is compared with
# what the figure and the terminal show (report.md: every HEADLINE metric)
MAIN = ("code/f1", "subcode/f1", "span/f1", "triplet/f1", "json_valid", "span_verbatim")


def name(model: str) -> str:
    return NAMES.get(model, model)


@dataclass(frozen=True)
class Estimates:
    """What the report, the console and the figure show, computed once from the counts."""

    messages: int
    seeds: int
    metrics: list[str]  # the HEADLINE metrics the counts hold
    models: dict[str, dict[str, Interval]]  # model -> metric -> estimate
    differences: dict[str, dict[str, Interval]]  # other model -> metric -> TAB-PO minus it
    mean_f1: dict[str, float]  # the paper's headline: mean of Code, Sub-code, Span F1


def estimate(result: DemoResult) -> Estimates:
    """Every model's intervals and TAB-PO's paired differences (``stats.Bootstrap``)."""
    boot = Bootstrap({m: np.asarray(c) for m, c in result.counts.items()}, result.columns)
    present = {c.rsplit("/", 1)[0] for c in boot.columns}
    keys = [k for k in HEADLINE if k.removesuffix("/f1") in present]
    others = [m for m in result.counts if m != FOCUS]
    rivals = sorted(others, key=lambda m: m == "sft") if FOCUS in result.counts else []  # SFT last
    return Estimates(
        messages=boot.messages,
        seeds=max(len(v) for v in result.counts.values()),
        metrics=keys,
        models={m: {k: boot.interval(m, k) for k in keys} for m in result.counts},
        differences={m: {k: boot.difference(FOCUS, m, k) for k in keys} for m in rivals},
        mean_f1={m: sum(boot.point(m, k) for k in ("code/f1", "subcode/f1", "span/f1")) / 3
                 for m in result.counts},
    )  # fmt: skip


def table(e: Estimates) -> str:
    """A Markdown table: one row per model, each metric as "mean [low, high]"."""
    rows = [f"| {name(m)} | " + " | ".join(cell(i) for i in found.values()) + " |"
            for m, found in e.models.items()]  # fmt: skip
    return "\n".join([header(e.metrics, "method"), *rows])


def differences(e: Estimates) -> str:
    """A Markdown table of TAB-PO minus each other model, paired; bold: excludes 0."""
    rows = [f"| {name(FOCUS)} − {name(m)} | " + " | ".join(cell(d, signed=True) for d in
            found.values()) + " |" for m, found in e.differences.items()]  # fmt: skip
    return "\n".join([header(e.metrics, "difference"), *rows])


def verdict(d: Interval) -> str:
    if not d.resolved:
        return "not distinguishable"
    return f"{name(FOCUS)} {'better' if d.value > 0 else 'worse'}"


def verdicts(e: Estimates, keys: Sequence[str] | None = None) -> list[str]:
    """One sentence per compared model: each metric's difference, as measured."""
    return [f"{name(FOCUS)} vs {name(m)}: " + ", ".join(
                f"{LABELS[k]} {cell(d, signed=True, bold=False)} ({verdict(d)})"
                for k, d in found.items() if keys is None or k in keys) + "."
            for m, found in e.differences.items()]  # fmt: skip


def header(keys: list[str], first: str) -> str:
    return (f"| {first} | " + " | ".join(LABELS[k] for k in keys) + " |\n|---|"
            + "---:|" * len(keys))  # fmt: skip


def cell(i: Interval, *, signed: bool = False, bold: bool = True) -> str:
    """The interval as "mean [low, high]"; a difference signed, bold when it excludes 0."""
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f"{f.format(i.value)} [{f.format(i.low)}, {f.format(i.high)}]"
    return f"**{text}**" if signed and bold and i.resolved else text


def intervals_over(e: Estimates) -> str:
    return f"the {e.messages} test messages" + (
        f" and the {e.seeds} training seeds" if e.seeds > 1 else "")  # fmt: skip


PREVIEW = "A preview: one training seed."


def preview(e: Estimates) -> str:
    """What a one-seed run (the default ``make demo``) leaves out; "" with more seeds."""
    if e.seeds > 1:
        return ""
    return (f"Its intervals are over the {e.messages} test messages only, so they leave out "
            "how much a method varies between training seeds; `tabpo demo --full` trains all "
            "baselines with 3 seeds, and its intervals cover messages and seeds.")  # fmt: skip


def summary(e: Estimates) -> str:
    """The tables, the sentences and the caveat, as report.md shows them."""
    lines = [f"Each metric with its {LEVEL:.0%} confidence interval (bootstrap over "
             f"{intervals_over(e)}):", "", table(e), ""]  # fmt: skip
    if e.differences:
        lines += [f"{name(FOCUS)} minus each model, paired (the same resampled messages"
                  + (" and seeds" if e.seeds > 1 else "") + " on both sides; bold: the "
                  "interval excludes 0, a real difference):", "", differences(e), "",
                  *verdicts(e), ""]  # fmt: skip
    if preview(e):
        lines += [f"**{PREVIEW}** {preview(e)}", ""]
    return "\n".join(lines)


def relative_to_sft(mean_f1: dict[str, float]) -> str:
    """The paper's headline, each model's mean of Code / Sub-code / Span F1 relative to SFT's;
    the means themselves where SFT's is 0 (a collapsed SFT model), which no ratio describes."""
    others = {m: v for m, v in mean_f1.items() if m != "sft"}
    if mean_f1["sft"] > 0:
        return "Mean of Code / Sub-code / Span micro-F1, relative to SFT: " + ", ".join(
            f"{name(m)} {100 * (v / mean_f1['sft'] - 1):+.1f}%" for m, v in others.items()
        )
    return "Mean of Code / Sub-code / Span micro-F1 (SFT's is 0, so none is relative to it): " + (
        ", ".join(f"{name(m)} {v:.3f}" for m, v in others.items())
    )


def write(result: DemoResult, out: Path, command: str) -> Path:
    from tabpo.clinical.figure import figure  # it draws this module's estimates

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dumps(result))
    e = estimate(result)
    figure(result, out / "figure.png", e)
    lines = [
        "# tabpo demo: SFT vs preference methods on the synthetic clinical-message benchmark",
        "",
        f"Command: `{command}`",
        "",
        summary(e),
        relative_to_sft(e.mean_f1),
        "",
        f"Intervals: percentile bootstrap, {REPLICATES} replicates drawn from seed {SEED}; "
        "each replicate draws the training seeds, then the test messages, with replacement, "
        "and takes the mean over the drawn seeds of the micro metric on the drawn messages "
        "(docs/method.md §5). SFT is one model: messages only.",
        "",
        "Pairs: " + ", ".join(f"{k} {v}" for k, v in result.pair_stats.items()),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()),
        "",
        f"Time: {sum(result.seconds.values()):.0f} s in the stages below (wall clock, "
        f"{os.cpu_count()} CPUs; other work on the machine slows it): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()),
        "",
        "![Each metric with its interval, the paired differences, the chosen log-prob](figure.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def dumps(result: DemoResult) -> str:
    """results.json: indented, but a list of numbers on one line, and each seed's
    per-message counts (a list of such lists) on one line."""
    text = json.dumps(asdict(result), indent=2)
    text = re.sub(r"\[[\d.,\seE+-]*\]", lambda m: " ".join(m.group().split()), text)
    return re.sub(r"\[\s*(?:\[[\d, -]*\],?\s*)+\]", lambda m: re.sub(r"\s+", "", m.group()),
                  text) + "\n"  # fmt: skip


def read(path: Path) -> DemoResult:
    """A DemoResult back from its results.json."""
    doc = json.loads(Path(path).read_text())
    doc["curves"] = {m: [(int(x), float(y)) for x, y in c] for m, c in doc["curves"].items()}
    return DemoResult(**doc)
