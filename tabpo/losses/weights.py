"""Data-side token weights of TAB-PO (docs/method.md §1, steps 1-3).

For one completion of T tokens with character ranges [s_t, e_t) into its text:

    w_t = max(1, max{ w_f : an occurrence [a, b) of a value of field f has s_t < b, a < e_t })
    w_t = w_t * diff_factor   where token t differs from the other completion of the pair

Normalisation to a mean of 1 over the completion (step 4) is done in the loss, not here.
Arrays are float64 (weights) or bool (masks) of shape (T,).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from difflib import SequenceMatcher
from typing import Any

import numpy as np

DEFAULT_FIELD_WEIGHTS: dict[str, float] = {
    "Code": 1.1,
    "Sub-code": 1.2,
    "Subcode": 1.2,
    "Span": 1.1,
}
DIFF_FACTOR = 1.2
ALIGNMENTS = ("edit", "position")


class _Raw(str):
    """A JSON number or constant kept as its source text, so it can be found in the text."""


def field_value_weights(
    text: str,
    offsets: Sequence[tuple[int, int]],
    field_weights: Mapping[str, float] = DEFAULT_FIELD_WEIGHTS,
) -> np.ndarray:
    """Field-value weight of each token, shape (T,) float64.

        w_t = max(1, max{ w_f : token t overlaps an occurrence of a value of field f })

    `text` is the assistant answer (JSON-ish); `offsets[t] = (s, e)` is token t's character
    range in it. Every occurrence of every value is weighted, not just the one under the key
    (that is what the reference implementation does). Tokens with s == e (special tokens,
    or tokens outside the text) keep 1.0, and so do keys, quotes, braces and whitespace.
    """
    char_w = np.ones(len(text))
    for field, value in _field_values(text, field_weights):
        w = float(field_weights[field])
        for form in _search_forms(value):
            for start in _occurrences(text, form):
                span = char_w[start : start + len(form)]
                np.maximum(span, w, out=span)
    weights = np.ones(len(offsets))
    for t, (s, e) in enumerate(offsets):
        s, e = max(int(s), 0), min(int(e), len(text))
        if s < e:
            weights[t] = char_w[s:e].max()
    return weights


def difference_masks(
    chosen_ids: Sequence[int], rejected_ids: Sequence[int], align: str = "edit"
) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens of each completion differ from the other one, two bool arrays.

    - ``"position"`` (the reference implementation): token k against token k for
      k < min(T+, T-); tokens past the shorter length are not marked.
    - ``"edit"`` (default): align the two id sequences by difflib's matching blocks (an
      edit script close to the longest common subsequence) and mark every token outside a
      matching block. It is the default because a label that changes length, an inserted
      or a deleted item then marks only the tokens that really changed; by position every
      token after the first change is shifted and counts as "different".
    """
    a, b = list(chosen_ids), list(rejected_ids)
    if align == "position":
        n = min(len(a), len(b))
        diff = [a[k] != b[k] for k in range(n)]
        mask_a, mask_b = np.zeros(len(a), dtype=bool), np.zeros(len(b), dtype=bool)
        mask_a[:n], mask_b[:n] = diff, diff
        return mask_a, mask_b
    if align == "edit":
        mask_a, mask_b = np.ones(len(a), dtype=bool), np.ones(len(b), dtype=bool)
        for i, j, size in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
            mask_a[i : i + size] = False
            mask_b[j : j + size] = False
        return mask_a, mask_b
    raise ValueError(f"unknown align {align!r}; expected one of {ALIGNMENTS}")


def pair_token_weights(
    chosen_text: str,
    chosen_offsets: Sequence[tuple[int, int]],
    chosen_ids: Sequence[int],
    rejected_text: str,
    rejected_offsets: Sequence[tuple[int, int]],
    rejected_ids: Sequence[int],
    *,
    field_weights: Mapping[str, float] = DEFAULT_FIELD_WEIGHTS,
    diff_factor: float = DIFF_FACTOR,
    align: str = "edit",
) -> tuple[np.ndarray, np.ndarray]:
    """Token weights of a chosen/rejected pair, two float64 arrays of shapes (T+,), (T-,).

        w_t = field_value_weight_t * (diff_factor if token t differs else 1)

    so a differing Sub-code token gets 1.2 * 1.2 = 1.44 with the defaults.
    """
    if len(chosen_offsets) != len(chosen_ids) or len(rejected_offsets) != len(rejected_ids):
        raise ValueError("each completion needs one (start, end) offset per token id")
    diff_c, diff_r = difference_masks(chosen_ids, rejected_ids, align)
    w_c = field_value_weights(chosen_text, chosen_offsets, field_weights)
    w_r = field_value_weights(rejected_text, rejected_offsets, field_weights)
    return np.where(diff_c, w_c * diff_factor, w_c), np.where(diff_r, w_r * diff_factor, w_r)


def _field_values(text: str, fields: Mapping[str, float]) -> list[tuple[str, str]]:
    """(field, value text) for every configured key at any depth; regex when not JSON."""
    try:
        tree = json.loads(text, parse_int=_Raw, parse_float=_Raw, parse_constant=_Raw)
    except ValueError:
        return _regex_values(text, fields)
    found: list[tuple[str, str]] = []
    _walk(tree, fields, found)
    return found


def _walk(node: Any, fields: Mapping[str, float], found: list[tuple[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in fields:
                found.extend((key, s) for s in _scalar_texts(value))
            _walk(value, fields, found)
    elif isinstance(node, list):
        for item in node:
            _walk(item, fields, found)


def _scalar_texts(value: Any) -> list[str]:
    """Strings as they are, numbers as their source text, booleans as JSON; null is no value."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _scalar_texts(item)]
    return []


def _regex_values(text: str, fields: Mapping[str, float]) -> list[tuple[str, str]]:
    """`"key": "value"` (or a bare number/boolean) pairs of text that does not parse."""
    found: list[tuple[str, str]] = []
    for key in fields:
        quoted_key = re.escape(json.dumps(key))
        pattern = quoted_key + r'\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d[\w.+-]*|true|false))'
        for m in re.finditer(pattern, text, flags=re.DOTALL):
            if m.group(1) is None:
                found.append((key, m.group(2)))
            else:
                found.append((key, _unescape(m.group(1))))
    return found


def _unescape(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def _search_forms(value: str) -> set[str]:
    """The value itself and its JSON-escaped forms (quotes, backslashes, \\uXXXX)."""
    forms = {str(value), json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return {f for f in forms if f}


def _occurrences(text: str, needle: str) -> Iterator[int]:
    """Start of every occurrence, overlapping ones included."""
    start = text.find(needle)
    while start >= 0:
        yield start
        start = text.find(needle, start + 1)
