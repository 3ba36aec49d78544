"""Metrics of docs/method.md §5 on hand-made examples, expected numbers worked by hand."""

from __future__ import annotations

import json

import pytest

from tabpo.clinical.evaluation import (
    match_spans,
    parse_prediction,
    prf,
    score,
    snap_span,
    spans_match,
)

PP, SEB, CCP = "PartnershipPatient", "SocioEmotionalBehaviour", "CareCoordinationPatient"


def _i(code, sub, span):
    return {"Code": code, "Sub-code": sub, "Span": span}


def _doc(*items):
    return json.dumps({"results": list(items)})


ECON = _i("SDOH", "EconomicStability", "I can't pay")


# --- parsing ------------------------------------------------------------------------------


def test_parse_valid_json():
    parsed = parse_prediction(_doc(ECON))
    assert parsed.items == [ECON] and parsed.valid_json
    assert parse_prediction('{"results": []}') == ([], True)
    assert parse_prediction("[1, 2]") == ([], True)  # valid JSON, no items
    single = parse_prediction('{"Code": "SDOH", "Subcode": "EconomicStability", "Span": "x"}')
    assert single.items == [_i("SDOH", "EconomicStability", "x")]


def test_parse_html_entities():
    text = _doc(ECON).replace('"', "&quot;")
    assert parse_prediction(text) == ([ECON], False)


def test_parse_single_quotes():
    text = "{'results': [{'Code': 'SDOH', 'Sub-code': 'EconomicStability', 'Span': 'rent'}]}"
    assert parse_prediction(text) == ([_i("SDOH", "EconomicStability", "rent")], False)
    # keys out of order: only json.loads after the replacement reads it, not the regex
    text = "[{'Span': 'rent', 'Sub-code': 'EconomicStability', 'Code': 'SDOH'}]"
    assert parse_prediction(text) == ([_i("SDOH", "EconomicStability", "rent")], False)


def test_parse_regex_extraction_keeps_apostrophes():
    """Truncated JSON after chatter: both complete objects are recovered; the apostrophe
    of "can't" (turned into a quote for the regex) comes back; the cut object is lost."""
    text = (
        "Sure! ```json\n" + _doc(ECON, _i(SEB, "None", 'he said "no"'))[:-2] + ", "
        '{"Code": "CareCoordinationPatient", "Sub-code": "None", "Sp'
    )
    parsed = parse_prediction(text)
    assert parsed.items == [ECON, _i(SEB, "None", 'he said "no"')]
    assert not parsed.valid_json


def test_parse_garbage_is_empty():
    assert parse_prediction("I cannot annotate this message.") == ([], False)
    assert parse_prediction("") == ([], False)


# --- span matching ------------------------------------------------------------------------


def test_span_containment_and_jaccard_edges():
    """Token sets, lower-cased: {a,b,c,d} vs {a,b,c,e}: 3 / 5 = 0.6 -> match (>= 0.6);
    {a,b,c,d,e} vs {a,b,c,d,f,g}: 4 / 7 = 0.571 -> no; containment in either direction
    matches whatever the Jaccard (1 / 5 here); an empty span never matches."""
    assert spans_match("a b c d", "A B C E")
    assert not spans_match("a b c d e", "a b c d f g")
    assert spans_match("copay", "I can't afford my copay")
    assert spans_match("I can't afford my copay", "copay")
    assert not spans_match("", "copay") and not spans_match("copay", "  ")


def test_greedy_matching_is_one_to_one_in_prediction_order():
    """Prediction 0 "a b c d" contains both golds and takes the first, "a b"; prediction 1
    "a b" then finds only "c d", which it does not match: 1 match, not the optimal 2."""
    assert match_spans(["a b c d", "a b"], ["a b", "c d"]) == [(0, 0)]
    assert match_spans(["x y", "x y"], ["x y"]) == [(0, 0)]
    assert match_spans(["c d", "a b"], ["a b", "c d"]) == [(0, 1), (1, 0)]


def test_prf_zero_division():
    """P = 2/3, R = 2/2, F1 = 4/5; 0/0 -> 0."""
    assert prf(2, 1, 0) == pytest.approx((2 / 3, 1.0, 0.8))
    assert prf(0, 0, 0) == (0.0, 0.0, 0.0)


# --- score --------------------------------------------------------------------------------

MESSAGES = ["Hi Dr. Patel,\nThank you so much for the help.", "I am scared of it. Please call me."]
GOLDS = [
    _doc(
        _i(PP, "Appreciation/Gratitude", "Thank you so much"), _i(PP, "salutation", "Hi Dr. Patel")
    ),
    _doc(_i(SEB, "None", "I am scared")),
]
PREDICTIONS = [
    _doc(
        _i(PP, "Appreciation/Gratitude", "thank you so much"),
        _i(PP, "alignment", "Hi Dr. Patel"),
        _i("Bogus", "foo", "x"),
    ),
    "{'results': [{'Code': 'SocioEmotionalBehaviour', 'Sub-code': 'None', 'Span': 'I am  scared'}, "
    "{'Code': 'CareCoordinationPatient', 'Sub-code': 'None', 'Span': 'call me'}]}",
]


def test_score_by_hand():
    """Example 1: codes {PP} vs {PP} ("Bogus" ignored): TP 1. Sub-codes {Appreciation,
    salutation} vs {Appreciation, alignment} ("foo" ignored): TP 1 FP 1 FN 1. Spans: "thank
    you so much" ~ "Thank you so much", "Hi Dr. Patel" = "Hi Dr. Patel", "x" unmatched:
    TP 2 FP 1. Triplets: case differs, alignment != salutation, Bogus: TP 0 FP 3 FN 2.
    Example 2 (single quotes, not valid JSON): codes {SEB} vs {SEB, CCP}: TP 1 FP 1.
    Sub-codes: only "None", ignored. Spans: "I am  scared" ~ "I am scared", "call me"
    unmatched: TP 1 FP 1. Triplets: SEB matches after whitespace normalisation: TP 1 FP 1.

    code    TP 2 FP 1 FN 0 -> P 2/3, R 1,   F1 4/5
    subcode TP 1 FP 1 FN 1 -> P 1/2, R 1/2, F1 1/2
    span    TP 3 FP 2 FN 0 -> P 3/5, R 1,   F1 6/8
    triplet TP 1 FP 4 FN 2 -> P 1/5, R 1/3, F1 2/8
    json_valid 1/2; verbatim: "Hi Dr. Patel", "call me" of 5 spans -> 2/5.
    """
    out = score(GOLDS, PREDICTIONS, messages=MESSAGES)
    expected = {
        "code/p": 2 / 3, "code/r": 1.0, "code/f1": 0.8,
        "subcode/p": 0.5, "subcode/r": 0.5, "subcode/f1": 0.5,
        "span/p": 0.6, "span/r": 1.0, "span/f1": 0.75,
        "triplet/p": 0.2, "triplet/r": 1 / 3, "triplet/f1": 0.25,
        "json_valid": 0.5, "span_verbatim": 0.4,
    }  # fmt: skip
    assert out == pytest.approx(expected)


def test_score_with_snapping_reported_separately():
    """Snapping "thank you so much" gives "Thank you so much" (case-insensitive find) and
    "I am  scared" gives the window "I am scared" (Jaccard 1); "x" has no overlap and stays.
    Triplets: TP 2 FP 3 FN 1 -> F1 4/8; spans unchanged at 6/8; plain keys unchanged."""
    out = score(GOLDS, PREDICTIONS, messages=MESSAGES, snap=True)
    assert out["snap_triplet/f1"] == pytest.approx(0.5)
    assert out["snap_span/f1"] == pytest.approx(0.75)
    assert out["triplet/f1"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="messages"):
        score(GOLDS, PREDICTIONS, snap=True)


def test_none_and_out_of_schema_labels_are_ignored():
    """Gold and prediction hold only "None" sub-codes and an unknown code: no sub-code and
    no code counts at all, so P = R = F1 = 0 by the 0/0 rule; spans still count (TP 2)."""
    gold = [[_i(SEB, "None", "a b"), _i("Unknown", "None", "c d")]]
    pred = [[_i(CCP, "None", "a b"), _i("Unknown", "None", "c d")]]
    out = score(gold, pred)
    assert out["subcode/f1"] == 0.0 and out["subcode/p"] == 0.0
    assert out["code/p"] == 0.0 and out["code/r"] == 0.0  # SEB vs CCP: TP 0 FP 1 FN 1
    assert out["span/f1"] == 1.0
    assert out["triplet/f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # "Unknown" matches


def test_strict_triplet_needs_exact_span():
    """ "I am scared" vs "I am scared of it": relaxed match (containment), strict miss."""
    out = score([[_i(SEB, "None", "I am scared")]], [[_i(SEB, "None", "I am scared of it")]])
    assert out["span/f1"] == 1.0 and out["triplet/f1"] == 0.0


def test_snap_span_windows():
    message = "Hi Dr. Patel,\nMy apartment has mold and it is cold."
    assert snap_span("Dr. Patel", message) == "Dr. Patel"  # verbatim
    assert snap_span("my apartment has mold", message) == "My apartment has mold"
    # tokens {apartment, has, mould}: best window "apartment has" (2/3, shortest of the ties)
    assert snap_span("apartment has mould", message) == "apartment has"
    # tokens keep their punctuation, as in the metric: "patel" is not "patel,"
    assert snap_span("hello dr. patel", message) == "Dr."
    # {has, mold, now}: "has mold" scores 2/3, more than one word (1/3) or
    # "apartment has mold" (2/4)
    assert snap_span("has mold now", message) == "has mold"
    assert snap_span("zzz", message) == "zzz"


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="predictions"):
        score([[]], [])
