"""The paper's evaluation of JSON annotations (docs/method.md §5), plus stricter metrics.

Every metric is micro-averaged over the whole test set, from summed counts:

    P = TP / (TP + FP),  R = TP / (TP + FN),  F1 = 2 TP / (2 TP + FP + FN)   (0 when 0 / 0)

- code: per example, the set of predicted codes against the set of gold codes; codes
  outside the schema are ignored on both sides.
- subcode: the same over sub-code strings, independent of the code; "None" and strings
  that are no sub-code of the schema are ignored.
- span (relaxed, the paper's): per example, greedy one-to-one matching of predicted to gold
  spans; a pair matches when one lower-cased whitespace-token set contains the other or
  their token Jaccard is >= 0.6. Predictions are taken in their order, each matched to the
  first still-unmatched gold span (gold order) it matches. Empty spans match nothing.
- triplet (strict): (code, sub-code, span) multisets, the span compared exactly after
  whitespace normalisation (case kept); every item counts, in the schema or not.
- json_valid: fraction of raw predictions that `json.loads` accepts as they are.
- span_verbatim: fraction of predicted spans that are substrings of their message.

`message_counts` keeps each message's counts, so the metrics of any resample of the
messages are `from_counts` of its sums (the demo's bootstrap intervals, ``stats.py``).
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from tabpo.clinical.schema import NONE, SCHEMA, Item, item

JACCARD_MIN = 0.6
Annotation = str | Sequence[Mapping[str, Any]]

_OBJECT = re.compile(
    r'\{\s*"Code"\s*:\s*"(?P<code>(?:[^"\\]|\\.)*)"\s*,\s*"Sub-?code"\s*:\s*'
    r'"(?P<sub>(?:[^"\\]|\\.)*)"\s*,\s*"Span"\s*:\s*"(?P<span>.*?)"\s*\}',
    re.DOTALL,
)


class Parsed(NamedTuple):
    """The items of one prediction and whether its raw text was valid JSON."""

    items: list[Item]
    valid_json: bool


def parse_prediction(text: str) -> Parsed:
    """Items of a model answer, recovering what it can (docs/method.md §5).

    1. ``json.loads(text)``; valid JSON gives its items, whatever its shape.
    2. Otherwise unescape HTML entities and try ``json.loads`` again, then also with every
       single quote replaced by a double quote.
    3. Otherwise regex-extract every ``{"Code": .., "Sub-code": .., "Span": ..}`` object
       from the quote-replaced text; a Span value runs to the first quote followed by
       ``}``, and the values are read from the text before the replacement, so an
       apostrophe inside a span survives.
    4. Nothing found: no items.

    Items are ``{"results": [...]}`` entries, a bare list of entries or a single entry;
    "Subcode" is read as "Sub-code"; a missing field reads as "".
    """
    try:
        return Parsed(_items(json.loads(text)), True)
    except ValueError:
        pass
    unescaped = html.unescape(text)
    quoted = unescaped.replace("'", '"')
    for candidate in (unescaped, quoted):
        try:
            return Parsed(_items(json.loads(candidate)), False)
        except ValueError:
            pass
    # the replacement keeps every offset, so values are read back from the unreplaced text
    found = [
        item(*(_unquote(unescaped[m.start(g) : m.end(g)]) for g in ("code", "sub", "span")))
        for m in _OBJECT.finditer(quoted)
    ]
    return Parsed(found, False)


def _items(tree: Any) -> list[Item]:
    if isinstance(tree, dict) and "results" in tree:
        tree = tree["results"]
    if isinstance(tree, dict):
        tree = [tree]
    if not isinstance(tree, list):
        return []
    return [
        item(_text(e.get("Code")), _text(e.get("Sub-code", e.get("Subcode"))), _text(e.get("Span")))
        for e in tree
        if isinstance(e, Mapping)
    ]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _unquote(raw: str) -> str:
    """A JSON string body with its escapes resolved (as it is when they do not parse)."""
    try:
        return str(json.loads(f'"{raw}"'))
    except ValueError:
        return raw.replace('\\"', '"')


def tokens(span: str) -> set[str]:
    """The lower-cased whitespace-token set the span metric compares."""
    return set(span.lower().split())


def spans_match(predicted: str, gold: str) -> bool:
    """Relaxed match: one token set contains the other, or token Jaccard >= 0.6; "" never."""
    a, b = tokens(predicted), tokens(gold)
    if not a or not b:
        return False
    return a <= b or b <= a or len(a & b) / len(a | b) >= JACCARD_MIN


def match_spans(predicted: Sequence[str], gold: Sequence[str]) -> list[tuple[int, int]]:
    """Greedy one-to-one (prediction index, gold index) matches, in prediction order."""
    used: set[int] = set()
    pairs = []
    for i, p in enumerate(predicted):
        for j, g in enumerate(gold):
            if j not in used and spans_match(p, g):
                used.add(j)
                pairs.append((i, j))
                break
    return pairs


def snap_span(span: str, message: str) -> str:
    """The substring of the message that best matches a predicted span.

    A verbatim span stays; a case-insensitive occurrence is taken with the message's case.
    Otherwise every window of consecutive whitespace words of the message, 1 to 2n + 2 words
    long for an n-token span, is scored by the metric's token Jaccard with the span; the
    best wins (ties: the shorter, then the earlier). No overlap at all leaves the span.
    """
    if not span or span in message:
        return span
    at = message.lower().find(span.lower())
    if at >= 0 and len(message.lower()) == len(message):
        return message[at : at + len(span)]
    target = tokens(span)
    words = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"\S+", message)]
    best, best_key = None, (0.0, 0, 0)
    for i in range(len(words)):
        window: set[str] = set()
        for j in range(i, min(len(words), i + 2 * len(target) + 2)):
            window.add(words[j][2])
            jaccard = len(window & target) / len(window | target)
            key = (jaccard, i - j, -i)
            if jaccard > 0 and key > best_key:
                best, best_key = (words[i][0], words[j][1]), key
    if best is None:
        return span
    return message[best[0] : best[1]]


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Micro precision, recall and F1 from counts; 0.0 for any 0 / 0."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return p, r, f1


def score(
    golds: Sequence[Annotation],
    predictions: Sequence[Annotation],
    *,
    snap: bool = False,
    messages: Sequence[str] | None = None,
    schema: Mapping[str, Sequence[str]] = SCHEMA,
) -> dict[str, float]:
    """All metrics of a test set: ``{code,subcode,span,triplet}/{p,r,f1}``, ``json_valid``.

    Golds and predictions are raw texts (parsed with `parse_prediction`) or item lists
    (counted as valid JSON). With `messages`, also ``span_verbatim``. With ``snap=True``
    (needs `messages`), also ``snap_span/*`` and ``snap_triplet/*``: the same metrics after
    each predicted span is replaced by `snap_span` of it; the paper reports no snapping.
    """
    return from_counts(summed(message_counts(golds, predictions, snap=snap, messages=messages,
                                             schema=schema)))  # fmt: skip


# Per message, each metric's counts: (tp, fp, fn) for an F1, (hits, total) for a rate.
RATES = ("json_valid", "span_verbatim")
Counts = dict[str, list[tuple[int, ...]]]


def message_counts(
    golds: Sequence[Annotation],
    predictions: Sequence[Annotation],
    *,
    snap: bool = False,
    messages: Sequence[str] | None = None,
    schema: Mapping[str, Sequence[str]] = SCHEMA,
) -> Counts:
    """The counts `score` sums, one tuple per message: ``code``, ``subcode``, ``span``,
    ``triplet`` (and ``snap_span``, ``snap_triplet``) give (tp, fp, fn); ``json_valid``
    (valid, 1) and ``span_verbatim`` (verbatim spans, predicted spans). Any resample of the
    messages gives its metrics by `from_counts` of its sums (the confidence intervals)."""
    if len(golds) != len(predictions):
        raise ValueError(f"{len(golds)} golds but {len(predictions)} predictions")
    if messages is not None and len(messages) != len(golds):
        raise ValueError(f"{len(golds)} golds but {len(messages)} messages")
    if snap and messages is None:
        raise ValueError("snap=True needs the messages")
    gold_items = [read_annotation(g)[0] for g in golds]
    parsed = [read_annotation(p) for p in predictions]
    pred_items = [items for items, _ in parsed]
    codes = set(schema)
    subcodes = {s for subs in schema.values() for s in subs} - {NONE}
    pairs = list(zip(gold_items, pred_items, strict=True))
    out: Counts = {
        "code": [_set_counts(g, p, "Code", codes) for g, p in pairs],
        "subcode": [_set_counts(g, p, "Sub-code", subcodes) for g, p in pairs],
        "span": [_span_counts(g, p) for g, p in pairs],
        "triplet": [_triplet_counts(g, p) for g, p in pairs],
        "json_valid": [(int(valid), 1) for _, valid in parsed],
    }
    if messages is not None:
        out["span_verbatim"] = [(sum(i["Span"] in m for i in items), len(items))
                                for items, m in zip(pred_items, messages, strict=True)]  # fmt: skip
    if snap and messages is not None:
        snapped = [
            [{**i, "Span": snap_span(i["Span"], m)} for i in items]
            for items, m in zip(pred_items, messages, strict=True)
        ]
        out["snap_span"] = [_span_counts(g, p) for g, p in zip(gold_items, snapped, strict=True)]
        out["snap_triplet"] = [_triplet_counts(g, p) for g, p in
                               zip(gold_items, snapped, strict=True)]  # fmt: skip
    return out


def summed(counts: Counts) -> dict[str, tuple[int, ...]]:
    """Each metric's counts summed over the messages."""
    empty = {name: (0, 0) if name in RATES else (0, 0, 0) for name in counts}
    return {name: tuple(map(sum, zip(*rows, strict=True))) or empty[name]
            for name, rows in counts.items()}  # fmt: skip


def from_counts(totals: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """The metrics of summed counts: ``name/{p,r,f1}`` by `prf`, a rate as hits / total."""
    out: dict[str, float] = {}
    for name, counts in totals.items():
        if name in RATES:
            hits, total = counts
            out[name] = hits / total if total else 0.0
        else:
            out[f"{name}/p"], out[f"{name}/r"], out[f"{name}/f1"] = prf(*counts)
    return out


def read_annotation(annotation: Annotation) -> Parsed:
    """Items of a raw text (via `parse_prediction`) or of an item list (valid JSON)."""
    if isinstance(annotation, str):
        return parse_prediction(annotation)
    return Parsed(_items(list(annotation)), True)


def _set_counts(gold: list[Item], pred: list[Item], key: str, allowed: set[str]) -> tuple[int, ...]:
    g = {i[key] for i in gold} & allowed
    p = {i[key] for i in pred} & allowed
    return len(g & p), len(p - g), len(g - p)


def _span_counts(gold: list[Item], pred: list[Item]) -> tuple[int, ...]:
    matched = len(match_spans([i["Span"] for i in pred], [i["Span"] for i in gold]))
    return matched, len(pred) - matched, len(gold) - matched


def _triplet_counts(gold: list[Item], pred: list[Item]) -> tuple[int, ...]:
    g, p = Counter(map(_triplet, gold)), Counter(map(_triplet, pred))
    hits = sum((g & p).values())
    return hits, sum(p.values()) - hits, sum(g.values()) - hits


def _triplet(i: Item) -> tuple[str, str, str]:
    return i["Code"], i["Sub-code"], " ".join(i["Span"].split())
