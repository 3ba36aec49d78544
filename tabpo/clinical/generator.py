"""Seeded synthetic secure messages in the paper's annotation schema, split four ways.

A message is an optional opening line (an annotated salutation or a bare one), a body of
1-4 sentences (annotated phrasings and unannotated fillers, shuffled) and an optional
closing line (an annotated sign-off or a bare one). It carries 0-3 items with distinct
(code, sub-code) labels allowed by its direction; P(0, 1, 2, 3 items) = ITEM_COUNT_PROBS.

The phrasings of every (direction, code, sub-code) are split by their index i in the
template tuple: i % 4 in {0, 1} -> "sft", 2 -> "pref", 3 -> "test" (50 / 25 / 25 %). The
splits draw from groups: sft <- "sft", pref <- "pref", dev <- "pref" (the dev split
measures how the SFT model generalises to phrasings it has not seen, without touching the
test phrasings), test <- "test". Slot fillers (names, drugs, tests, logistics) and filler
sentences are shared. Each split has its own random stream, seeded by the string
``f"{seed}:{split}"``, so resizing one split leaves the others unchanged.

The SFT split alone also perturbs its spans (`perturb`): with probability COPY_PROB an
annotated sentence has the words of its span shuffled, then each replaced, with probability
EDIT_PROB, by a word drawn from the SFT split's own vocabulary (and one such word inserted,
with the same probability), the gold span being the perturbed text. A small model trained
from scratch otherwise memorises the few hundred SFT sentences and recalls the nearest one
instead of copying; spans it cannot recall make it copy from the message, which is what
the held-out test phrasings need. The labels stay those of the template. `copy_split` is
the copying warm-up the shipped model trains on first.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path

from tabpo.clinical.fillers import CLOSINGS, FILLERS, OPENINGS, SLOTS
from tabpo.clinical.phrasings_patient import PATIENT
from tabpo.clinical.phrasings_provider import PROVIDER
from tabpo.clinical.prompt import build_prompt
from tabpo.clinical.schema import (
    DIRECTIONS,
    PATIENT_TO_PROVIDER,
    PROVIDER_TO_PATIENT,
    Item,
    canonical_json,
    item,
)
from tabpo.common.files import write_jsonl

Label = tuple[str, str]

SPLITS = ("sft", "pref", "dev", "test")
DEFAULT_SIZES: dict[str, int] = {"sft": 20000, "pref": 2000, "dev": 300, "test": 300}
SPLIT_GROUP: dict[str, str] = {"sft": "sft", "pref": "pref", "dev": "pref", "test": "test"}
SPLIT_FILES: dict[str, str] = {
    "sft": "train.jsonl",
    "pref": "pref.jsonl",
    "dev": "dev.jsonl",
    "test": "test.jsonl",
}
ITEM_COUNT_PROBS = (0.10, 0.30, 0.35, 0.25)
COPY_PROB = 0.5
EDIT_PROB = 0.1
MAX_SENTENCES = 4
PHRASINGS: dict[str, dict[Label, tuple[str, ...]]] = {
    PATIENT_TO_PROVIDER: PATIENT,
    PROVIDER_TO_PATIENT: PROVIDER,
}


def phrasing_group(index: int) -> str:
    """The group of the index-th template of a label: 0, 1 -> sft; 2 -> pref; 3 -> test (mod 4)."""
    return ("sft", "sft", "pref", "test")[index % 4]


def phrasings(direction: str, group: str) -> dict[Label, tuple[str, ...]]:
    """The templates of each label of a direction that belong to one group."""
    return {
        label: tuple(t for i, t in enumerate(templates) if phrasing_group(i) == group)
        for label, templates in PHRASINGS[direction].items()
    }


def render(template: str, slots: Mapping[str, str]) -> tuple[str, tuple[int, int] | None]:
    """The filled sentence and the character range of its ``[span]`` (None without one)."""
    if "[" not in template:
        return template.format_map(slots), None
    head, _, rest = template.partition("[")
    span, _, tail = rest.partition("]")
    head, span, tail = (part.format_map(slots) for part in (head, span, tail))
    return head + span + tail, (len(head), len(head) + len(span))


@cache
def sft_vocabulary() -> tuple[str, ...]:
    """The words of the SFT split's world: its templates, the fillers and the values of the
    slots they use, without punctuation (no word only a held-out phrasing uses)."""
    texts = [t for d in DIRECTIONS for ts in phrasings(d, "sft").values() for t in ts]
    texts += [t for d in DIRECTIONS for t in (*FILLERS[d], *OPENINGS[d], *CLOSINGS[d])]
    texts += [v for t in texts for name in re.findall(r"{(\w+)}", t) for v in SLOTS[name]]
    words = re.findall(r"[A-Za-z][A-Za-z']*", " ".join(re.sub(r"{\w+}", " ", t) for t in texts))
    return tuple(sorted(set(words)))


def perturb(rng: random.Random, text: str, where: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """The sentence with its span's words shuffled, then replaced and one inserted, each with
    probability EDIT_PROB, by words of `sft_vocabulary`; the new span's range (module
    docstring). The span keeps the template's words (the label's cues) in an order only
    copying reproduces."""
    words, vocabulary = text[where[0] : where[1]].split(" "), sft_vocabulary()
    rng.shuffle(words)
    words = [rng.choice(vocabulary) if rng.random() < EDIT_PROB else w for w in words]
    if rng.random() < EDIT_PROB:
        words.insert(rng.randint(0, len(words)), rng.choice(vocabulary))
    span = " ".join(words)
    return text[: where[0]] + span + text[where[1] :], (where[0], where[0] + len(span))


def generate_message(
    rng: random.Random, direction: str, group: str = "sft"
) -> tuple[str, list[Item]]:
    """One message of the direction and its items, in order of appearance."""
    table = phrasings(direction, group)
    slots = {name: rng.choice(values) for name, values in SLOTS.items()}
    count = rng.choices(range(len(ITEM_COUNT_PROBS)), weights=ITEM_COUNT_PROBS)[0]
    labels = rng.sample(sorted(table), count)

    def annotated(label: Label) -> tuple[str, Label | None, tuple[int, int] | None]:
        text, where = render(rng.choice(table[label]), slots)
        if group == "sft" and where is not None and rng.random() < COPY_PROB:
            text, where = perturb(rng, text, where)
        return text, label, where

    def bare(options: tuple[str, ...]) -> tuple[str, Label | None, tuple[int, int] | None]:
        return render(rng.choice(options), slots)[0], None, None

    edges = {label[1]: label for label in labels if label[1] in ("salutation", "signoff")}
    body = [annotated(label) for label in labels if label[1] not in edges]
    fewest = 0 if body else 1
    n_fillers = rng.randint(fewest, min(MAX_SENTENCES - len(body), fewest + 1))
    for filler in rng.sample(FILLERS[direction], n_fillers):
        body.insert(rng.randint(0, len(body)), bare((filler,)))
    opening = annotated(edges["salutation"]) if "salutation" in edges else bare(OPENINGS[direction])
    closing = annotated(edges["signoff"]) if "signoff" in edges else bare(CLOSINGS[direction])
    return _assemble([[opening], body, [closing]])


def _assemble(
    lines: list[list[tuple[str, Label | None, tuple[int, int] | None]]],
) -> tuple[str, list[Item]]:
    """Sentences joined by spaces, non-empty lines by newlines; items sorted by position."""
    text, found = "", []
    for sentences in lines:
        sentences = [s for s in sentences if s[0]]
        if not sentences:
            continue
        if text:
            text += "\n"
        for k, (sentence, label, where) in enumerate(sentences):
            if k:
                text += " "
            if label is not None and where is not None:
                found.append((len(text) + where[0], len(text) + where[1], label))
            text += sentence
    found.sort()
    return text, [item(code, sub, text[start:end]) for start, end, (code, sub) in found]


def make_record(message: str, items: Iterable[Item], direction: str) -> dict[str, str]:
    """The prompt/completion record of one annotated message."""
    return {
        "prompt": build_prompt(message, direction),
        "completion": canonical_json(items),
        "message": message,
        "direction": direction,
    }


COPY_INSTRUCTION = "Copy every sentence of this message, in order, as a JSON list."


def copy_split(
    size: int, pieces: Sequence[str], seed: int = 0, stream: str = "copy"
) -> list[dict[str, str]]:
    """`size` records of the copying warm-up (the shipped model's first stage; its SFT stage
    replays others, from the stream "replay"): a message of
    1-4 sentences of 3-12 random words and, as the completion, the JSON list of its
    sentences without their end marks. A word is 1-2 random `pieces` (the tokenizer's
    vocabulary as text, `copy_pieces`), so every token, including those only held-out
    phrasings use, is copied in training. Nothing but copying predicts the answer; the
    list's ``", "`` before a sentence is how the benchmark's ``"Span": "`` precedes a span."""
    rng = random.Random(f"{seed}:{stream}")
    records = []
    for _ in range(size):
        sentences = [" ".join("".join(rng.choice(pieces) for _ in range(rng.choice((1, 1, 2))))
                              for _ in range(rng.randint(3, 12)))
                     for _ in range(rng.randint(1, 4))]  # fmt: skip
        message = "".join((rng.choice(" \n ") if k else "") + sentence + rng.choice(".?!.")
                          for k, sentence in enumerate(sentences))  # fmt: skip
        records.append({"prompt": f"{COPY_INSTRUCTION}\nMessage:\n{message}",
                        "completion": json.dumps(sentences)})  # fmt: skip
    return records


def copy_pieces(tokens: Iterable[str]) -> list[str]:
    """The text of each token (decoded, spaces stripped) that has a letter or digit and
    nothing JSON escapes, sorted: the warm-up's word pieces."""
    return sorted({t.strip() for t in tokens if re.search(r"[A-Za-z0-9]", t)
                   and not re.search(r'["\\\s]', t.strip())})  # fmt: skip


def generate_split(name: str, size: int, seed: int = 0) -> list[dict[str, str]]:
    """`size` records of one split; directions alternate at random, 50 / 50."""
    if name not in SPLIT_GROUP:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    rng = random.Random(f"{seed}:{name}")
    records = []
    for _ in range(size):
        direction = rng.choice(DIRECTIONS)
        message, items = generate_message(rng, direction, SPLIT_GROUP[name])
        records.append(make_record(message, items, direction))
    return records


def generate_splits(
    seed: int = 0, sizes: Mapping[str, int] | None = None
) -> dict[str, list[dict[str, str]]]:
    """All four splits (sft, pref, dev, test); `sizes` overrides DEFAULT_SIZES per split."""
    wanted = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(wanted) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    return {name: generate_split(name, wanted[name], seed) for name in SPLITS}


def write_splits(
    directory: str | Path, seed: int = 0, sizes: Mapping[str, int] | None = None
) -> dict[str, Path]:
    """train.jsonl (sft), pref.jsonl, dev.jsonl and test.jsonl in `directory`, by split."""
    splits = generate_splits(seed, sizes)
    return {name: write_jsonl(splits[name], Path(directory) / SPLIT_FILES[name]) for name in SPLITS}
