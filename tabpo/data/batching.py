"""Right-padded NumPy batches of encoded pairs, ready for any backend.

Every array is (B, T), with one T for chosen and rejected so a backend can run both as one
(2B, T) forward. Column t of a mask or weight array refers to token t of the ids, i.e. to
log pi(ids[t] | ids[:t]); position 0 is never a completion position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from tabpo.data.encoding import EncodedPair

T = TypeVar("T", bound=Any)


@dataclass
class PairBatch:
    """Right-padded pairs: ids int64, the rest float32, all (B, T); `indices` (B,) int64.

    The ``rejected_*`` arrays are None in a batch of prompt/completion examples (SFT data):
    then only the chosen side runs through the model.
    """

    chosen_ids: np.ndarray
    rejected_ids: np.ndarray | None
    chosen_attention_mask: np.ndarray
    rejected_attention_mask: np.ndarray | None
    chosen_mask: np.ndarray
    rejected_mask: np.ndarray | None
    chosen_weights: np.ndarray
    rejected_weights: np.ndarray | None
    indices: np.ndarray

    @property
    def size(self) -> int:
        return int(self.chosen_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Prompt + completion tokens of both sides (what a separate forward of each runs)."""
        rejected = 0 if self.rejected_attention_mask is None else self.rejected_attention_mask.sum()
        return int(self.chosen_attention_mask.sum() + rejected)


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """Right-pad pairs to one common length T = max over pairs and sides of prompt+completion."""
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    with_rejected = [p.rejected_ids is not None for p in pairs]
    if any(with_rejected) and not all(with_rejected):
        raise ValueError("cannot batch preference pairs together with completion-only examples")
    length = max(
        len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids or [])) for p in pairs
    )
    chosen = _pad([(p.prompt_ids, p.chosen_ids, p.chosen_weights) for p in pairs], length, pad_id)
    rejected: tuple[np.ndarray | None, ...] = (None,) * 4
    if all(with_rejected):
        rejected = _pad(
            [(p.prompt_ids, p.rejected_ids or [], p.rejected_weights) for p in pairs],
            length,
            pad_id,
        )
    return PairBatch(
        chosen_ids=chosen[0],
        rejected_ids=rejected[0],
        chosen_attention_mask=chosen[1],
        rejected_attention_mask=rejected[1],
        chosen_mask=chosen[2],
        rejected_mask=rejected[2],
        chosen_weights=chosen[3],
        rejected_weights=rejected[3],
        indices=np.array([p.index for p in pairs], dtype=np.int64),
    )


def batches(
    pairs: Sequence[EncodedPair],
    batch_size: int,
    *,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[PairBatch]:
    """Batches in file order, or in the order of default_rng(seed).permutation when shuffled."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(pairs)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield collate([pairs[i] for i in chunk], pad_id)


def _pad(
    rows: list[tuple[list[int], list[int], np.ndarray | None]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention mask, completion mask and weights of one side, each (B, T)."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), length), dtype=np.float32)
    mask, weights = np.zeros_like(attention), np.zeros_like(attention)
    for b, (prompt, completion, w) in enumerate(rows):
        n, end = len(prompt), len(prompt) + len(completion)
        ids[b, :end] = prompt + completion
        attention[b, :end] = 1.0
        mask[b, n:end] = 1.0
        weights[b, n:end] = w
    return ids, attention, mask, weights


def concat_sides(batch: PairBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention mask and completion mask of chosen and rejected stacked to (2B, T)
    (just the chosen (B, T) in a completion-only batch)."""
    if batch.rejected_ids is None:
        return batch.chosen_ids, batch.chosen_attention_mask, batch.chosen_mask
    assert batch.rejected_attention_mask is not None and batch.rejected_mask is not None
    return (
        np.concatenate([batch.chosen_ids, batch.rejected_ids]),
        np.concatenate([batch.chosen_attention_mask, batch.rejected_attention_mask]),
        np.concatenate([batch.chosen_mask, batch.rejected_mask]),
    )


def split_rows(x: T, pairs: int) -> tuple[T, T | None]:
    """(N, ...) stacked sides -> chosen (B, ...) and rejected (B, ...), or None when N = B."""
    return x[:pairs], (x[pairs:] if x.shape[0] > pairs else None)  # type: ignore[index]
