"""Preference pairs of docs/method.md §4: confusion tables, edits, build_pairs."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from tabpo.clinical import (
    PATIENT_TO_PROVIDER,
    canonical_json,
    generate_split,
    is_valid,
    read_completion,
)
from tabpo.clinical.pairs import (
    EDIT_PROBS,
    build_pairs,
    confusion_tables,
    first_half,
    make_rejected,
    make_rejected_with_edit,
)

PP, SDP, SEB = "PartnershipPatient", "SharedDecisionPatient", "SocioEmotionalBehaviour"
P2P = PATIENT_TO_PROVIDER
# docs/method.md §4, copied by hand
METHOD_PROBS = {
    "code_swap": 0.25,
    "subcode_swap": 0.35,
    "code_subcode_swap": 0.20,
    "drop": 0.08,
    "add_spurious": 0.12,
}


def _i(code, sub, span):
    return {"Code": code, "Sub-code": sub, "Span": span}


def _within(count, n, p, k=4.0):
    """count / n within k binomial standard errors of p."""
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def test_confusion_tables_by_hand():
    """Ex 1: codes {PP} vs {PP, SEB}: no FN, nothing. Sub-codes FN {alignment, build trust},
    FP {statePreferences, None}: 4 cells + 1. Ex 2: code SDOH -> SDP, sub-code
    EconomicStability -> ExploreOptions. Ex 3 (garbage): FN only, no FP, nothing.
    Ex 4: alignment -> statePreferences again (2 in all). Ex 5: alignment is predicted
    right, so only connection -> expressOpinions counts."""
    golds = [
        [_i(PP, "alignment", "a"), _i(PP, "build trust", "b")],
        [_i("SDOH", "EconomicStability", "c")],
        [_i(PP, "alignment", "d")],
        [_i(PP, "alignment", "e")],
        [_i(PP, "alignment", "f"), _i(PP, "connection", "g")],
    ]
    preds = [
        [_i(PP, "statePreferences", "a"), _i(SEB, "None", "b")],
        canonical_json([_i(SDP, "ExploreOptions", "c")]),
        "not json",
        [_i(PP, "statePreferences", "e")],
        [_i(PP, "alignment", "f"), _i(PP, "expressOpinions", "g")],
    ]
    codes, subs = confusion_tables(golds, preds)
    assert codes == {"SDOH": {SDP: 1}}
    assert subs == {
        "alignment": {"statePreferences": 2, "None": 1},
        "build trust": {"statePreferences": 1, "None": 1},
        "EconomicStability": {"ExploreOptions": 1},
        "connection": {"expressOpinions": 1},
    }


def test_edit_frequencies_match_the_stated_probabilities():
    """3 items, one with sub-code siblings: every edit is possible on the first try, so
    edit frequencies are the stated probabilities (20,000 draws, 4 standard errors)."""
    gold = [
        _i(PP, "alignment", "I agree with you"),
        _i(SEB, "None", "so scared"),
        _i(PP, "signoff", "Best, Al"),
    ]
    rng, n = random.Random(0), 20000
    kinds = Counter(make_rejected_with_edit(gold, rng, {}, {}, P2P)[1] for _ in range(n))
    assert EDIT_PROBS == METHOD_PROBS
    for name, p in METHOD_PROBS.items():
        assert _within(kinds[name], n, p), (name, kinds[name] / n)


def test_impossible_edits_are_retried():
    """One "None"-code item: sub-code swap and drop are impossible and retried, so the
    outcomes are code swap 0.25/0.57, code+sub-code 0.20/0.57, spurious 0.12/0.57 (the
    chance of 10 failures in a row, 0.43^10 = 2e-4, is allowed as None)."""
    gold = [_i(SEB, "None", "I am so scared")]
    rng, n = random.Random(1), 8000
    made = [make_rejected_with_edit(gold, rng, {}, {}, P2P) for _ in range(n)]
    kinds = Counter(m[1] for m in made if m is not None)
    assert set(kinds) == {"code_swap", "code_subcode_swap", "add_spurious"}
    assert _within(kinds["code_swap"], n, 0.25 / 0.57)
    assert _within(kinds["add_spurious"], n, 0.12 / 0.57)
    assert sum(m is None for m in made) <= 10


def test_no_gold_items_no_rejected():
    assert make_rejected([], random.Random(0), {}, {}, P2P) is None


def test_subcode_swaps_follow_confusion_counts():
    """Row alignment -> {statePreferences: 3, build trust: 1, Clinical Care: 50}: "Clinical
    Care" is no sibling under PartnershipPatient, so P(statePreferences) = 3/4."""
    gold = [_i(PP, "alignment", "that makes sense")]
    subs = {"alignment": Counter({"statePreferences": 3, "build trust": 1, "Clinical Care": 50})}
    rng, got = random.Random(2), Counter()
    while sum(got.values()) < 4000:
        rejected, kind = make_rejected_with_edit(gold, rng, {}, subs, P2P)
        if kind == "subcode_swap":
            got[rejected[0]["Sub-code"]] += 1
    assert set(got) == {"statePreferences", "build trust"}
    assert _within(got["statePreferences"], 4000, 0.75)


def test_empty_row_is_uniform_over_siblings():
    """No counts: the 9 other PartnershipPatient sub-codes, each 1/9."""
    gold = [_i(PP, "alignment", "that makes sense")]
    rng, got = random.Random(3), Counter()
    while sum(got.values()) < 9000:
        rejected, kind = make_rejected_with_edit(gold, rng, {}, {}, P2P)
        if kind == "subcode_swap":
            got[rejected[0]["Sub-code"]] += 1
    assert len(got) == 9 and "alignment" not in got
    assert all(_within(c, 9000, 1 / 9) for c in got.values())


def test_code_swap_follows_counts_and_keeps_a_valid_subcode():
    """Row SEB -> {CareCoordinationPatient: 1, CareCoordinationProvider: 100}: the provider
    code is invalid in a patient message, so every code swap gives CareCoordinationPatient,
    and "None" is valid there, so it stays."""
    gold = [_i(SEB, "None", "so scared")]
    codes = {SEB: Counter({"CareCoordinationPatient": 1, "CareCoordinationProvider": 100})}
    rng, seen = random.Random(4), 0
    while seen < 200:
        made = make_rejected_with_edit(gold, rng, codes, {}, P2P)
        if made is not None and made[1] == "code_swap":
            assert made[0] == [_i("CareCoordinationPatient", "None", "so scared")]
            seen += 1


def test_spurious_item_takes_the_first_half_of_a_span():
    """5 words -> the first 2 ("I can't"), kept verbatim; 1 word stays whole."""
    assert first_half("I can't  afford the copay") == "I can't"
    assert first_half("Hi") == "Hi"
    gold = [_i("SDOH", "EconomicStability", "I can't afford the copay")]
    rng = random.Random(5)
    while True:
        rejected, kind = make_rejected_with_edit(gold, rng, {}, {}, P2P)
        if kind == "add_spurious":
            break
    assert rejected[0] == gold[0] and rejected[1]["Span"] == "I can't"
    assert (rejected[1]["Code"], rejected[1]["Sub-code"]) != ("SDOH", "EconomicStability")


@pytest.fixture(scope="module")
def records():
    return generate_split("pref", 300, seed=11)


def test_rejected_is_direction_valid_and_differs(records):
    rng = random.Random(6)
    for record in records:
        gold = read_completion(record["completion"])
        rejected = make_rejected(gold, rng, {}, {}, record["direction"])
        if not gold:
            assert rejected is None
            continue
        assert rejected is not None and rejected != gold
        assert all(is_valid(i["Code"], i["Sub-code"], record["direction"]) for i in rejected)
        assert all(i["Span"] in record["message"] for i in rejected)


def test_build_pairs_rule(records):
    pairs, stats = build_pairs(records, strategy="rule", seed=0)
    empty = sum(r["completion"] == '{"results": []}' for r in records)
    assert stats["no_edit"] == empty and stats["pairs"] == len(pairs) == len(records) - empty
    assert sum(v for k, v in stats.items() if k.startswith("edit/")) == len(pairs)
    by_prompt = {r["prompt"]: r for r in records}
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["chosen"] != pair["rejected"]
        assert pair["chosen"] == by_prompt[pair["prompt"]]["completion"]
        assert pair["rejected"] == canonical_json(json.loads(pair["rejected"])["results"])
    assert build_pairs(records, strategy="rule", seed=0) == (pairs, stats)
    assert build_pairs(records, strategy="rule", seed=1)[0] != pairs


def test_build_pairs_model_and_confusion(records):
    """Model answers: record 0 a wrong valid answer (becomes the rejected), record 1 the
    gold itself (falls back to an edit), the rest garbage (fall back to an edit)."""
    recs = [r for r in records if r["completion"] != '{"results": []}'][:5]
    wrong = canonical_json([_i(SEB, "None", "x")])
    preds = [wrong, recs[1]["completion"], "garbage", "garbage", "garbage"]
    pairs, stats = build_pairs(recs, preds, strategy="model", seed=0)
    assert stats["from_model"] == 1 and pairs[0]["rejected"] == wrong
    assert len(pairs) == 5 and all(p["chosen"] != p["rejected"] for p in pairs)
    conf, stats = build_pairs(recs, preds, strategy="confusion", seed=0)
    assert stats["from_model"] == 0 and len(conf) == 5
    with pytest.raises(ValueError, match="predictions"):
        build_pairs(recs, strategy="confusion")
    with pytest.raises(ValueError, match="unknown strategy"):
        build_pairs(recs, preds, strategy="random")
