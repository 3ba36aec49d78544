"""Token weights (docs/method.md §1): field values, difference marks, their product.

Two hand-checkable "tokenizers" are used:

- whitespace: tokens are the runs of non-space characters, offsets counted by hand;
- words: ``\\w+|\\S`` (a word or one punctuation character; whitespace is not a token), so the
  canonical annotation

      {"results": [{"Code": "PartnershipPatient", "Sub-code": "build trust",
                    "Span": "I trust your judgement"}]}

  is the 39 tokens (index: token)

      0 {  1 "  2 results  3 "  4 :  5 [  6 {  7 "  8 Code  9 "  10 :  11 "
      12 PartnershipPatient  13 "  14 ,  15 "  16 Sub  17 -  18 code  19 "  20 :  21 "
      22 build  23 trust  24 "  25 ,  26 "  27 Span  28 "  29 :  30 "
      31 I  32 trust  33 your  34 judgement  35 "  36 }  37 ]  38 }

  One item is 31 tokens (6 to 36); the header ``{"results": [`` is 6 and ``]}`` is 2.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tabpo.losses.weights import (
    DEFAULT_FIELD_WEIGHTS,
    DIFF_FACTOR,
    difference_masks,
    field_value_weights,
    pair_token_weights,
)

ITEM_B = (
    '{"Code": "PartnershipPatient", "Sub-code": "build trust", "Span": "I trust your judgement"}'
)
ITEM_A = '{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "rent is late"}'
GOLD = '{"results": [' + ITEM_B + "]}"

# field-value weights of GOLD's 39 word tokens: Code 12 -> 1.1, Sub-code 22-23 -> 1.2,
# Span 31-34 -> 1.1, everything else 1.0
GOLD_FIELDS = np.ones(39)
GOLD_FIELDS[12] = 1.1
GOLD_FIELDS[22:24] = 1.2
GOLD_FIELDS[31:35] = 1.1


class Words:
    """``\\w+|\\S`` tokenizer with one shared vocabulary, so equal strings get equal ids."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        matches = list(re.finditer(r"\w+|\S", text))
        ids = [self.vocab.setdefault(m.group(), len(self.vocab)) for m in matches]
        return ids, [m.span() for m in matches]


def marked(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def test_defaults_are_the_reference_values():
    assert DEFAULT_FIELD_WEIGHTS == {"Code": 1.1, "Sub-code": 1.2, "Subcode": 1.2, "Span": 1.1}
    assert DIFF_FACTOR == 1.2


def test_field_values_on_whitespace_tokens():
    """Offsets counted by hand in ITEM_A
    ``{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "rent is late"}``:

    {"Code": (0,8)  "SDOH", (9,16)  "Sub-code": (17,28)  "EconomicStability", (29,49)
    "Span": (50,57)  "rent (58,63)  is (64,66)  late"} (67,73)

    SDOH sits at [10,14) -> token 1 gets 1.1; EconomicStability at [30,47) -> token 3 gets 1.2;
    "rent is late" at [59,71) -> tokens 5, 6, 7 get 1.1; the key tokens 0, 2, 4 stay 1.0.
    """
    text = ITEM_A
    offsets = [(0, 8), (9, 16), (17, 28), (29, 49), (50, 57), (58, 63), (64, 66), (67, 73)]
    assert [text[s:e] for s, e in offsets] == text.split()
    got = field_value_weights(text, offsets)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [1.0, 1.1, 1.0, 1.2, 1.0, 1.1, 1.1, 1.1])


def test_configurable_field_map_and_every_occurrence():
    """``{"label": "pain", "note": "pain in knee"}`` with {"label": 2.0}:

    {"label": (0,9)  "pain", (10,17)  "note": (18,25)  "pain (26,31)  in (32,34)  knee"} (35,41)

    "pain" occurs at [11,15) and [27,31): tokens 1 and 3 get 2.0 although only the first is
    under "label". With the default map no key matches and every token stays 1.0.
    """
    text = '{"label": "pain", "note": "pain in knee"}'
    offsets = [(0, 9), (10, 17), (18, 25), (26, 31), (32, 34), (35, 41)]
    assert [text[s:e] for s, e in offsets] == text.split()
    np.testing.assert_allclose(
        field_value_weights(text, offsets, {"label": 2.0}), [1, 2, 1, 2, 1, 1]
    )
    np.testing.assert_allclose(field_value_weights(text, offsets), np.ones(6))


def test_escaped_value_is_found():
    r"""``{"Span": "he said \"no\""}``: the parsed value ``he said "no"`` is not in the text,
    its JSON-escaped form ``he said \"no\"`` is, at [10,24).

    {"Span": (0,8)  "he (9,12)  said (13,17)  \"no\""} (18,26) -> 1.0, 1.1, 1.1, 1.1
    """
    text = r'{"Span": "he said \"no\""}'
    offsets = [(0, 8), (9, 12), (13, 17), (18, 26)]
    assert [text[s:e] for s, e in offsets] == text.split()
    np.testing.assert_allclose(field_value_weights(text, offsets), [1.0, 1.1, 1.1, 1.1])


def test_regex_fallback_on_truncated_json():
    """``{"Code": "SDOH", "Sub-code": "Econ`` does not parse; the regex still finds
    Code = SDOH (token ``"SDOH",`` at (9,16) -> 1.1) and no Sub-code value (unterminated).
    """
    text = '{"Code": "SDOH", "Sub-code": "Econ'
    offsets = [(0, 8), (9, 16), (17, 28), (29, 34)]
    assert [text[s:e] for s, e in offsets] == text.split()
    np.testing.assert_allclose(field_value_weights(text, offsets), [1.0, 1.1, 1.0, 1.0])


def test_numbers_special_tokens_and_out_of_range_offsets():
    """``{"Code": 42}``: the number is found as its text "42" at [9,11), so token (9,12) gets
    1.1. Empty ranges (special tokens) and ranges past the text (an appended EOS) stay 1.0.
    """
    text = '{"Code": 42}'
    np.testing.assert_allclose(
        field_value_weights(text, [(0, 8), (9, 12), (10, 10), (12, 20)]), [1.0, 1.1, 1.0, 1.0]
    )


def test_gold_annotation_field_weights():
    """The table in the module docstring: 12 -> 1.1, 22 and 23 -> 1.2, 31-34 -> 1.1."""
    ids, offsets = Words()(GOLD)
    assert len(ids) == 39
    np.testing.assert_allclose(field_value_weights(GOLD, offsets), GOLD_FIELDS)


def test_sibling_label_swap():
    """build trust -> connection. Rejected = chosen tokens 0-21, ``connection`` (22), then
    chosen 24-38 shifted by one (23-37): 38 tokens.

    edit: prefix 0-21 and suffix (chosen 24-38 = rejected 23-37) match, so chosen marks
    {22, 23} (build, trust: 1.2 * 1.2 = 1.44) and rejected marks {22} (connection: 1.44).
    position: k = 22 differs, and for k = 23..37 rejected[k] = chosen[k+1], which differs from
    chosen[k] (no two neighbours of chosen 23-38 are equal), so both mark 22-37; chosen 38 is
    past the shorter length. Weights by position: chosen 22-23 -> 1.44, 31-34 -> 1.1 * 1.2 =
    1.32, other marked 1.2, 38 -> 1.0.
    """
    words = Words()
    c_ids, c_off = words(GOLD)
    rejected = GOLD.replace("build trust", "connection")
    r_ids, r_off = words(rejected)
    assert len(r_ids) == 38

    mc, mr = difference_masks(c_ids, r_ids)
    assert (marked(mc), marked(mr)) == ([22, 23], [22])
    wc, wr = pair_token_weights(GOLD, c_off, c_ids, rejected, r_off, r_ids)
    want_c = GOLD_FIELDS.copy()
    want_c[22:24] = 1.44
    want_r = np.delete(GOLD_FIELDS, 23)
    want_r[22] = 1.44
    np.testing.assert_allclose(wc, want_c)
    np.testing.assert_allclose(wr, want_r)

    mc, mr = difference_masks(c_ids, r_ids, align="position")
    assert marked(mc) == list(range(22, 38))
    assert marked(mr) == list(range(22, 38))
    wc, _ = pair_token_weights(GOLD, c_off, c_ids, rejected, r_off, r_ids, align="position")
    want_c = np.full(39, 1.2)
    want_c[:22], want_c[38] = GOLD_FIELDS[:22], 1.0
    want_c[22:24], want_c[31:35] = 1.44, 1.32
    np.testing.assert_allclose(wc, want_c)


def test_dropped_item():
    """Chosen has two items [B, A], rejected only [B].

    chosen: header + B = 0-36, ``,`` 37, item A 38-66 (29 tokens: 24 scaffolding + SDOH 44,
    EconomicStability 54, rent is late 62-64), ``]`` 67, ``}`` 68. rejected = GOLD, 39 tokens.
    edit: chosen 0-36 = rejected 0-36 and chosen 67-68 = rejected 37-38, so chosen marks only
    the comma and item A (37-66, 30 tokens) and rejected nothing. Weights of chosen: 44 ->
    1.1 * 1.2 = 1.32, 54 -> 1.2 * 1.2 = 1.44, 62-64 -> 1.32, the other marked ones 1.2.
    position: k < 39; 37 (``,`` vs ``]``) and 38 (``{`` vs ``}``) differ in both, and chosen
    39-68, most of the dropped item, is not marked at all.
    """
    words = Words()
    chosen = '{"results": [' + ITEM_B + ", " + ITEM_A + "]}"
    c_ids, c_off = words(chosen)
    r_ids, r_off = words(GOLD)
    assert len(c_ids) == 69

    mc, mr = difference_masks(c_ids, r_ids, align="edit")
    assert (marked(mc), marked(mr)) == (list(range(37, 67)), [])
    wc, wr = pair_token_weights(chosen, c_off, c_ids, GOLD, r_off, r_ids)
    want_c = np.ones(69)
    want_c[:39] = GOLD_FIELDS
    want_c[37:67] = 1.2
    want_c[44], want_c[54], want_c[62:65] = 1.32, 1.44, 1.32
    np.testing.assert_allclose(wc, want_c)
    np.testing.assert_allclose(wr, GOLD_FIELDS)

    mc, mr = difference_masks(c_ids, r_ids, align="position")
    assert (marked(mc), marked(mr)) == ([37, 38], [37, 38])


def test_span_cut_short():
    """Span "I trust your judgement" -> "I trust your": rejected = chosen 0-33 then ``" } ] }``
    (38 tokens). edit: chosen 0-33 and 35-38 match rejected 0-33 and 34-37, so only
    ``judgement`` (34) is marked: 1.1 * 1.2 = 1.32; rejected keeps its field weights (Span
    tokens 31-33 -> 1.1). position: chosen 34-37 against ``" } ] }`` all differ.
    """
    words = Words()
    c_ids, c_off = words(GOLD)
    rejected = GOLD.replace("your judgement", "your")
    r_ids, r_off = words(rejected)

    mc, mr = difference_masks(c_ids, r_ids)
    assert (marked(mc), marked(mr)) == ([34], [])
    wc, wr = pair_token_weights(GOLD, c_off, c_ids, rejected, r_off, r_ids)
    want_c = GOLD_FIELDS.copy()
    want_c[34] = 1.32
    np.testing.assert_allclose(wc, want_c)
    np.testing.assert_allclose(wr, np.delete(GOLD_FIELDS, 34))

    mc, mr = difference_masks(c_ids, r_ids, align="position")
    assert (marked(mc), marked(mr)) == ([34, 35, 36, 37], [34, 35, 36, 37])


def test_custom_factor_and_identical_pair():
    """diff_factor 2 on the swap: build -> 1.2 * 2 = 2.4. Identical sequences mark nothing."""
    words = Words()
    c_ids, c_off = words(GOLD)
    rejected = GOLD.replace("build trust", "connection")
    r_ids, r_off = words(rejected)
    wc, _ = pair_token_weights(GOLD, c_off, c_ids, rejected, r_off, r_ids, diff_factor=2.0)
    assert wc[22] == pytest.approx(2.4)
    for align in ("edit", "position"):
        mc, mr = difference_masks(c_ids, c_ids, align=align)
        assert not mc.any() and not mr.any()


def test_unknown_align_and_offset_count():
    with pytest.raises(ValueError, match="align"):
        difference_masks([1], [2], align="lcs")
    with pytest.raises(ValueError, match="offset"):
        pair_token_weights("a", [(0, 1)], [1, 2], "b", [(0, 1)], [3])
