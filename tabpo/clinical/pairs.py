"""Preference pairs by minimal, schema-valid edits of the gold annotation (docs/method.md §4).

Confusion tables, from an SFT model's greedy predictions: for each example, with
FN = gold labels not predicted and FP = predicted labels not in gold (label sets),

    confusion[t][p] += 1   for every t in FN and p in FP

separately for codes and for sub-codes ("None" included: it is what the code-less items
carry). One rejected per gold example, edit drawn with EDIT_PROBS:

- code_swap (0.25): one item's code -> another code of the direction, drawn in proportion
  to confusion[code]; the sub-code stays when valid under the new code, else one of the new
  code's sub-codes is drawn in proportion to confusion[sub-code].
- subcode_swap (0.35): one item's sub-code -> a sibling under the same code, in proportion
  to confusion[sub-code]; only items whose code has siblings ("None" codes have none).
- code_subcode_swap (0.20): code as above, then a sub-code of the new code other than the
  old one (the old one only when it is the new code's only sub-code: "None" -> "None").
- drop (0.08): one item removed; needs at least 2 items.
- add_spurious (0.12): after a random item, a new item whose span is the first half of that
  item's words (floor, at least one word, cut from the span so it stays verbatim) and whose
  label is a code+sub-code swap of that item's label: a plausible false positive.

Draws are uniform among the valid candidates when their confusion counts are all zero
(an empty row). An impossible edit counts as a failed try; after MAX_TRIES failed tries
(a different edit type is drawn each time) there is no rejected. An example with no gold
item therefore never gets one: every edit needs an existing item (we skip it rather than
invent a span).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tabpo.clinical.evaluation import Annotation, read_annotation
from tabpo.clinical.schema import SCHEMA, Item, canonical_json, codes_for, item

Table = dict[str, Counter[str]]
Rng = random.Random

EDIT_PROBS: dict[str, float] = {
    "code_swap": 0.25,
    "subcode_swap": 0.35,
    "code_subcode_swap": 0.20,
    "drop": 0.08,
    "add_spurious": 0.12,
}
MAX_TRIES = 10
STRATEGIES = ("confusion", "rule", "model")


def confusion_tables(
    golds: Sequence[Annotation], predictions: Sequence[Annotation]
) -> tuple[Table, Table]:
    """(code table, sub-code table): ``table[gold label][predicted label]`` counts."""
    if len(golds) != len(predictions):
        raise ValueError(f"{len(golds)} golds but {len(predictions)} predictions")
    tables: tuple[Table, Table] = ({}, {})
    for gold, pred in zip(golds, predictions, strict=True):
        g, p = read_annotation(gold).items, read_annotation(pred).items
        for table, key in zip(tables, ("Code", "Sub-code"), strict=True):
            gold_labels, pred_labels = {i[key] for i in g}, {i[key] for i in p}
            for t in sorted(gold_labels - pred_labels):
                for q in sorted(pred_labels - gold_labels):
                    table.setdefault(t, Counter())[q] += 1
    return tables


def draw(rng: Rng, candidates: Sequence[str], row: Mapping[str, int] | None) -> str:
    """A candidate with probability row[c] / sum(row over candidates); uniform if all 0."""
    weights = [(row or {}).get(c, 0) for c in candidates]
    if sum(weights) > 0:
        return rng.choices(candidates, weights=weights)[0]
    return rng.choice(candidates)


def _new_code(rng: Rng, old: Item, code_table: Table, direction: str) -> str:
    return draw(
        rng, [c for c in codes_for(direction) if c != old["Code"]], code_table.get(old["Code"])
    )


def _code_swap(
    gold: list[Item], rng: Rng, ct: Table, st: Table, direction: str
) -> list[Item] | None:
    k = rng.randrange(len(gold))
    old = gold[k]
    code = _new_code(rng, old, ct, direction)
    sub = old["Sub-code"]
    if sub not in SCHEMA[code]:
        sub = draw(rng, SCHEMA[code], st.get(sub))
    return [*gold[:k], item(code, sub, old["Span"]), *gold[k + 1 :]]


def _subcode_swap(
    gold: list[Item], rng: Rng, ct: Table, st: Table, direction: str
) -> list[Item] | None:
    eligible = [k for k, i in enumerate(gold) if len(SCHEMA.get(i["Code"], ())) > 1]
    if not eligible:
        return None
    k = rng.choice(eligible)
    old = gold[k]
    siblings = [s for s in SCHEMA[old["Code"]] if s != old["Sub-code"]]
    sub = draw(rng, siblings, st.get(old["Sub-code"]))
    return [*gold[:k], item(old["Code"], sub, old["Span"]), *gold[k + 1 :]]


def _swapped_label(rng: Rng, old: Item, ct: Table, st: Table, direction: str) -> tuple[str, str]:
    code = _new_code(rng, old, ct, direction)
    subs = [s for s in SCHEMA[code] if s != old["Sub-code"]] or list(SCHEMA[code])
    return code, draw(rng, subs, st.get(old["Sub-code"]))


def _code_subcode_swap(
    gold: list[Item], rng: Rng, ct: Table, st: Table, direction: str
) -> list[Item] | None:
    k = rng.randrange(len(gold))
    code, sub = _swapped_label(rng, gold[k], ct, st, direction)
    return [*gold[:k], item(code, sub, gold[k]["Span"]), *gold[k + 1 :]]


def _drop(gold: list[Item], rng: Rng, ct: Table, st: Table, direction: str) -> list[Item] | None:
    if len(gold) < 2:
        return None
    k = rng.randrange(len(gold))
    return gold[:k] + gold[k + 1 :]


def _add_spurious(
    gold: list[Item], rng: Rng, ct: Table, st: Table, direction: str
) -> list[Item] | None:
    k = rng.randrange(len(gold))
    span = first_half(gold[k]["Span"])
    if not span:
        return None
    code, sub = _swapped_label(rng, gold[k], ct, st, direction)
    return [*gold[: k + 1], item(code, sub, span), *gold[k + 1 :]]


def first_half(span: str) -> str:
    """The span cut after its first max(1, n // 2) whitespace words (n words)."""
    words = list(re.finditer(r"\S+", span))
    if not words:
        return ""
    return span[words[0].start() : words[max(1, len(words) // 2) - 1].end()]


_EDITS: dict[str, Callable[[list[Item], Rng, Table, Table, str], list[Item] | None]] = {
    "code_swap": _code_swap,
    "subcode_swap": _subcode_swap,
    "code_subcode_swap": _code_subcode_swap,
    "drop": _drop,
    "add_spurious": _add_spurious,
}


def make_rejected_with_edit(
    items: Sequence[Mapping[str, str]],
    rng: Rng,
    code_table: Table,
    subcode_table: Table,
    message_direction: str,
) -> tuple[list[Item], str] | None:
    """A rejected annotation and the name of its edit, or None after MAX_TRIES failures."""
    gold = [item(i["Code"], i["Sub-code"], i["Span"]) for i in items]
    if not gold:
        return None
    names, probs = list(EDIT_PROBS), list(EDIT_PROBS.values())
    for _ in range(MAX_TRIES):
        name = rng.choices(names, weights=probs)[0]
        rejected = _EDITS[name](gold, rng, code_table, subcode_table, message_direction)
        if rejected is not None and canonical_json(rejected) != canonical_json(gold):
            return rejected, name
    return None


def make_rejected(
    items: Sequence[Mapping[str, str]],
    rng: Rng,
    code_table: Table,
    subcode_table: Table,
    message_direction: str,
) -> list[Item] | None:
    """A rejected annotation by one minimal schema-valid edit (module docstring), or None."""
    made = make_rejected_with_edit(items, rng, code_table, subcode_table, message_direction)
    return None if made is None else made[0]


def build_pairs(
    records: Sequence[Mapping[str, Any]],
    predictions: Sequence[Annotation] | None = None,
    *,
    strategy: str = "confusion",
    seed: int = 0,
    tables: tuple[Table, Table] | None = None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """``{"prompt", "chosen", "rejected"}`` pairs of prompt/completion records, and counts.

    - "confusion" (the paper's): edits drawn from the confusion tables of `predictions`
      (the SFT model's answers on these records), or of `tables` when given.
    - "rule": the same edits with empty tables, so every swap is uniform; no model needed.
    - "model": the model's own answer (re-serialised, labels and spans as the model wrote
      them) is the rejected when it parses (valid JSON or at least one recovered item) and
      differs from the gold; otherwise as "confusion" (tables from `predictions`).

    Chosen and rejected are both `canonical_json`; pairs with chosen == rejected are dropped.
    Counts: records, pairs, from_model, no_edit (no rejected could be made),
    dropped_identical, and edit/<name> per edit type.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if predictions is not None and len(predictions) != len(records):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    golds = [read_annotation(r["completion"]).items for r in records]
    if strategy == "rule":
        tables = ({}, {})
    elif tables is None:
        if predictions is None:
            raise ValueError(f"strategy {strategy!r} needs the model's predictions")
        tables = confusion_tables(golds, predictions)
    if strategy == "model" and predictions is None:
        raise ValueError("strategy 'model' needs the model's predictions")
    rng = random.Random(seed)
    stats = Counter(
        {"records": len(records), "from_model": 0, "no_edit": 0, "dropped_identical": 0}
    )
    stats.update({f"edit/{name}": 0 for name in EDIT_PROBS})
    pairs = []
    for k, (record, gold) in enumerate(zip(records, golds, strict=True)):
        chosen = canonical_json(gold)
        rejected = None
        if strategy == "model" and predictions is not None:
            parsed = read_annotation(predictions[k])
            if (parsed.valid_json or parsed.items) and canonical_json(parsed.items) != chosen:
                rejected = canonical_json(parsed.items)
                stats["from_model"] += 1
        if rejected is None:
            made = make_rejected_with_edit(gold, rng, *tables, record["direction"])
            if made is None:
                stats["no_edit"] += 1
                continue
            rejected = canonical_json(made[0])
            stats[f"edit/{made[1]}"] += 1
        if rejected == chosen:
            stats["dropped_identical"] += 1
            continue
        pairs.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected})
    stats["pairs"] = len(pairs)
    return pairs, dict(stats)
