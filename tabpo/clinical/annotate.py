"""The annotation task end to end on any backend: predict, score, build pairs.

Records are prompt/completion JSONL lines (``tabpo.clinical`` writes them, with the
``message`` each prompt annotates); the completion is the gold canonical JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabpo.clinical.evaluation import Counts, from_counts, message_counts, summed
from tabpo.clinical.pairs import build_pairs
from tabpo.common.errors import DataError
from tabpo.data.records import parse_record
from tabpo.training.backend import Backend
from tabpo.training.generation import generate

__all__ = ["count", "evaluate", "make_pairs", "predict", "read_records"]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Prompt/completion records, each checked like training data (file and line on error)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path=path) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg}", path=path, line=number) from None
        example = parse_record(record, path, number)
        if example.rejected is not None:
            raise DataError("expected a prompt/completion record, got a pair", path=path,
                            line=number, field="rejected")  # fmt: skip
        records.append({**record, "_prompt": example.prompt, "_line": number})
    if not records:
        raise DataError("no records", path=path)
    return records


def predict(
    backend: Backend, tokenizer: Any, records: Sequence[dict[str, Any]], *,
    max_new_tokens: int = 256, batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[str]:  # fmt: skip
    """The model's greedy answer to every record's prompt."""
    return generate(backend, tokenizer, [r["_prompt"] for r in records],
                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress)  # fmt: skip


def evaluate(
    records: Sequence[dict[str, Any]], predictions: Sequence[str], *, snap: bool = False
) -> dict[str, float]:
    """docs/method.md §5 metrics of ``predictions`` against the records' gold completions."""
    return from_counts(summed(count(records, predictions, snap=snap)))


def count(
    records: Sequence[dict[str, Any]], predictions: Sequence[str], *, snap: bool = False
) -> Counts:
    """The per-message counts `evaluate` sums (`tabpo.clinical.evaluation.message_counts`)."""
    messages = [str(r["message"]) for r in records if isinstance(r.get("message"), str)]
    have = len(messages) == len(records)
    return message_counts([r["completion"] for r in records], predictions, snap=snap and have,
                          messages=messages if have else None)  # fmt: skip


def make_pairs(
    records: Sequence[dict[str, Any]], predictions: Sequence[str] | None, *, strategy: str,
    seed: int,
) -> tuple[list[dict[str, str]], dict[str, int]]:  # fmt: skip
    """Preference pairs (prompt, chosen, rejected) with the records' own prompts."""
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    return build_pairs(plain, predictions, strategy=strategy, seed=seed)
