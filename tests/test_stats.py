"""The demo's confidence intervals (tabpo/clinical/stats.py), its report and its figure, on
synthetic counts whose truth is known: no model runs here."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tabpo.clinical import generate_split
from tabpo.clinical.demo import DemoResult
from tabpo.clinical.evaluation import message_counts, score
from tabpo.clinical.stats import Bootstrap, as_rows, metric

F1_COLUMNS = ["x/tp", "x/fp", "x/fn", "v/hit", "v/all"]


def simulate(rng, messages, seeds, p, r, seed_sd=0.0):
    """(seeds, messages, 5) counts: each message has 2 gold items, each found with
    probability p_s (p plus a seed's offset), one false positive with probability r, and
    a rate metric "v" that hits with probability p_s.

    The population's micro-F1 is that of the expected counts:
        F1 = 2 E[tp] / (2 E[tp] + E[fp] + E[fn]) = 4p / (4p + r + 2 - 2p)
    """
    out = []
    for _ in range(seeds):
        ps = float(np.clip(p + rng.normal(0.0, seed_sd), 0.0, 1.0)) if seed_sd else p
        tp = rng.binomial(2, ps, messages)
        fp = rng.binomial(1, r, messages)
        hit = rng.binomial(1, ps, messages)
        out.append(np.stack([tp, fp, 2 - tp, hit, np.ones(messages, int)], axis=1))
    return np.array(out)


@pytest.mark.parametrize("seeds, seed_sd", [(1, 0.0), (5, 0.03)])
def test_intervals_cover_the_truth_about_95_percent_of_the_time(seeds, seed_sd):
    """300 simulated test sets of 200 messages with a known truth (F1 = 0.6 / 0.76 = 0.789
    for p = 0.6, r = 0.3; the rate 0.6): the 95% interval covers it in 90-99% of them.
    A bug that forgot the seed level, or shrank the resample, covers far less; measured
    here: 0.97 / 0.96 (one seed), 0.97 / 0.98 (five seeds)."""
    p, r = 0.6, 0.3
    truth = {"x/f1": 4 * p / (4 * p + r + 2 - 2 * p), "v": p}
    rng = np.random.default_rng(1)
    covered = dict.fromkeys(truth, 0)
    trials = 300
    for t in range(trials):
        counts = simulate(rng, 200, seeds, p, r, seed_sd)
        boot = Bootstrap({"m": counts}, F1_COLUMNS, replicates=1000, seed=t)
        for name, value in truth.items():
            i = boot.interval("m", name)
            covered[name] += i.low <= value <= i.high
    rates = {k: v / trials for k, v in covered.items()}
    assert all(0.90 <= v <= 0.99 for v in rates.values()), rates


def test_seed_variation_widens_the_interval():
    """The same messages, with and without a spread between training seeds: resampling the
    seeds makes the interval wider when the seeds disagree."""
    rng = np.random.default_rng(0)
    calm = simulate(rng, 300, 3, 0.6, 0.3)
    spread = calm.copy()
    spread[0, :, :3] = simulate(np.random.default_rng(9), 300, 1, 0.3, 0.3)[0, :, :3]
    width = {}
    for label, counts in (("calm", calm), ("spread", spread)):
        i = Bootstrap({"m": counts}, F1_COLUMNS, seed=0).interval("m", "x/f1")
        width[label] = i.high - i.low
    assert width["spread"] > 1.5 * width["calm"], width


def test_paired_difference_is_narrower_than_unpaired():
    """Method b answers as a but for 5% of messages flipped: the two are correlated, so the
    paired interval of a - b (same draws on both sides) is several times narrower than the
    interval of independent resamples, and it resolves the small, real gap."""
    rng = np.random.default_rng(3)
    a = simulate(rng, 300, 3, 0.6, 0.3)
    b = a.copy()
    flip = rng.random((3, 300)) < 0.05
    b[..., 0] = np.where(flip & (a[..., 0] > 0), a[..., 0] - 1, a[..., 0])  # a found one more
    b[..., 2] = 2 - b[..., 0]
    boot = Bootstrap({"a": a, "b": b}, F1_COLUMNS, seed=0)
    paired = boot.difference("a", "b", "x/f1")
    unpaired = (Bootstrap({"a": a}, F1_COLUMNS, seed=1).replicates("a", "x/f1")
                - Bootstrap({"b": b}, F1_COLUMNS, seed=2).replicates("b", "x/f1"))  # fmt: skip
    lo, hi = np.percentile(unpaired, [2.5, 97.5])
    assert paired.value > 0 and paired.resolved
    assert (paired.high - paired.low) < 0.5 * (hi - lo)
    assert lo < 0 < hi  # the unpaired interval cannot tell them apart


def test_sft_without_seeds_pairs_with_every_seed():
    """A one-seed model (SFT) against a three-seed method: the draws of messages are shared,
    SFT's seed index is always its one seed; a - a is exactly zero."""
    rng = np.random.default_rng(4)
    method, sft = simulate(rng, 50, 3, 0.6, 0.3), simulate(rng, 50, 1, 0.5, 0.3)
    boot = Bootstrap({"sft": sft, "m": method}, F1_COLUMNS, replicates=200, seed=0)
    assert boot.sums("sft").shape == (200, 1, 5) and boot.sums("m").shape == (200, 3, 5)
    same = boot.difference("m", "m", "v")
    assert same.value == same.low == same.high == 0.0
    with pytest.raises(ValueError, match="1 or 3 seeds"):
        Bootstrap({"a": method, "b": method[:2]}, F1_COLUMNS)


def test_deterministic_given_the_seed():
    counts = simulate(np.random.default_rng(5), 80, 3, 0.6, 0.3)
    one, two = (Bootstrap({"m": counts}, F1_COLUMNS, seed=7).interval("m", "x/f1")
                for _ in range(2))  # fmt: skip
    assert one == two
    other = Bootstrap({"m": counts}, F1_COLUMNS, seed=8).interval("m", "x/f1")
    assert other.value == one.value and (other.low, other.high) != (one.low, one.high)


def predictions(records, rng, good):
    """Per record: the gold answer with probability ``good``, else a wrong code, a changed
    span, an empty answer or broken JSON."""
    out = []
    for r in records:
        gold = json.loads(r["completion"])["results"]
        roll = rng.random()
        if roll < good or not gold:
            out.append(r["completion"])
        elif roll < good + 0.1:
            out.append(json.dumps({"results": [{**gold[0], "Code": "SDOH"}]}))
        elif roll < good + 0.2:
            out.append(json.dumps({"results": [{**gold[0], "Span": "not in the message"}]}))
        elif roll < good + 0.3:
            out.append('{"results": []}')
        else:
            out.append(r["completion"][:-7])
    return out


def synthetic(seeds=3, messages=60, methods=(("dpo", 0.5), ("tabpo", 0.6))):
    """A DemoResult as run_demo builds it, from answers made up around the gold ones."""
    records = generate_split("test", messages, seed=1)
    golds, texts = [r["completion"] for r in records], [r["message"] for r in records]
    rng = random.Random(0)
    result = DemoResult(settings={"eval_split": "test", "seeds": seeds}, pair_stats={"pairs": 9})

    def add(model, good):
        result.add(model, message_counts(golds, predictions(records, rng, good), snap=True,
                                         messages=texts))  # fmt: skip

    add("sft", 0.4)
    for seed in range(seeds):
        for method, good in methods:
            add(method, good)
            if seed == 0:
                result.curves[method] = [(s, -10.0 - s * good) for s in range(1, 12)]
    return result, records


def test_full_sample_equals_the_reported_metrics():
    """From the counts alone: each seed's metric on all messages is evaluate()'s number, to
    the last bit; the point estimate is the mean over seeds."""
    result, records = synthetic()
    boot = Bootstrap({m: np.asarray(c) for m, c in result.counts.items()}, result.columns)
    for model, runs in result.counts.items():
        for rows, scores in zip(runs, result.scores[model], strict=True):
            sums = np.asarray(rows).sum(axis=0)
            for name in ("code/f1", "subcode/f1", "span/f1", "triplet/f1", "json_valid",
                         "span_verbatim", "snap_span/f1", "snap_triplet/f1"):  # fmt: skip
                assert float(metric(sums, result.columns, name)) == scores[name], (model, name)
        mean = np.mean([s["subcode/f1"] for s in result.scores[model]])
        assert boot.point(model, "subcode/f1") == pytest.approx(mean, abs=1e-12)
    golds = [r["completion"] for r in records]
    rng = random.Random(2)
    answers = predictions(records, rng, 0.5)
    counts = message_counts(golds, answers, snap=True, messages=[r["message"] for r in records])
    columns, rows = as_rows(counts)
    direct = score(golds, answers, snap=True, messages=[r["message"] for r in records])
    assert float(metric(np.sum(rows, axis=0), columns, "span/f1")) == direct["span/f1"]


def test_report_tables_and_sentences(tmp_path):
    from tabpo.clinical import report

    result, _ = synthetic()
    path = report.write(result, tmp_path, "tabpo demo --test")
    text = path.read_text()
    assert "| SFT | " in text and "| TAB-PO − DPO |" in text and "| TAB-PO − SFT |" in text
    sentence = next(line for line in text.splitlines() if line.startswith("TAB-PO vs DPO:"))
    assert "Code F1 " in sentence and ("(not distinguishable)" in sentence
                                      or "(TAB-PO better)" in sentence
                                      or "(TAB-PO worse)" in sentence)  # fmt: skip
    assert "preview" not in text  # three seeds
    assert "2000 replicates" in text
    # a report recomputed from results.json alone says the same
    again = report.read(tmp_path / "results.json")
    assert report.summary(report.estimate(again)) == report.summary(report.estimate(result))
    lines = (tmp_path / "results.json").read_text().splitlines()
    assert sum(line.strip().startswith("[[") for line in lines) == 7  # a line per run


def test_one_seed_is_a_preview_over_messages(tmp_path):
    from tabpo.clinical import report

    result, _ = synthetic(seeds=1)
    text = report.summary(report.estimate(result))
    assert "A preview: one training seed" in text and "--full" in text
    assert "over the 60 test messages only" in text


def test_figure_writes_a_png(tmp_path):
    from tabpo.clinical.figure import figure

    for seeds in (1, 3):
        result, _ = synthetic(seeds=seeds)
        figure(result, tmp_path / f"f{seeds}.png")
        assert (tmp_path / f"f{seeds}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    alone, _ = synthetic(seeds=1, methods=(("dpo", 0.5),))  # no TAB-PO: no differences
    figure(alone, tmp_path / "alone.png")
    assert (tmp_path / "alone.png").exists()


def test_headline_relative_to_sft_and_when_sft_scores_zero():
    """Each model's mean F1 relative to SFT's (0.4 -> 0.5 is +25.0%); an SFT model that
    annotates nothing (mean 0) gets the means themselves, not a ratio to 1e-9."""
    from tabpo.clinical.report import relative_to_sft

    line = relative_to_sft({"sft": 0.4, "dpo": 0.3, "tabpo": 0.5})
    assert line.endswith("relative to SFT: DPO -25.0%, TAB-PO +25.0%"), line
    collapsed = relative_to_sft({"sft": 0.0, "dpo": 0.098, "tabpo": 0.335})
    assert collapsed.endswith("(SFT's is 0, so none is relative to it): DPO 0.098, TAB-PO 0.335")
