"""What one decoder forward runs for a batch: chosen and rejected stacked, or forked.

A backend runs ``layout(batch, sharing)`` through its decoder and gets back, through
``targets``, per-token log-probs in the plain (N, T) matrices the losses read, whichever
layout ran.

**Plain** (``sharing="off"``, and every completion-only batch): the (2B, T) stack of
chosen and rejected, causal attention, positions 0..T-1.

**Forked** (shared prefix): a preference pair is one row. With c and r the chosen and
rejected token lists (prompt + completion) and S the length of their longest common prefix,

    ids       = c[:S] + c[S:] + r[S:]              L_b = |c| + |r| - S tokens
    positions = 0 .. |c|-1,   S .. |r|-1           each side sees its own positions
    segment   = 0 on c[:S], 1 on c[S:], 2 on r[S:]
    mask[i,j] = j <= i  and  (segment_j == 0  or  segment_j == segment_i)

so the rejected suffix attends to the shared prefix and to itself, never to the chosen
suffix: every hidden state equals the one the separate forward computes. The first token
of each suffix is predicted from position S-1, and a completion token inside the shared
prefix has one hidden state and one log-prob for both sides, so the LM head runs on it
once. Rows are right-padded to L = max_b L_b with segment -1; a padding row attends
causally to the shared prefix and earlier padding (never read, but finite).

``sharing="auto"`` forks a batch when that runs at most ``AUTO_FORK_RATIO`` of the
plain layout's padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tabpo.batching import PairBatch, Targets, concat_sides, targets

SHARING = ("auto", "on", "off")
AUTO_FORK_RATIO = 0.85
PAD_SEGMENT = -1


@dataclass(frozen=True)
class Layout:
    """ids (R, L) int64, attention (R, L) float32 (1 on tokens), positions (R, L) int64 and
    segments (R, L) int64 when forked (None: positions 0..L-1 and causal attention), the
    completion ``targets`` into the flattened (R*L) hidden rows, and ``shape`` (N, T) of
    the plain matrices the log-probs are scattered into."""

    ids: np.ndarray
    attention: np.ndarray
    positions: np.ndarray | None
    segments: np.ndarray | None
    targets: Targets
    shape: tuple[int, int]

    @property
    def forked(self) -> bool:
        return self.segments is not None

    @property
    def tokens(self) -> int:
        """Tokens the forward runs (padding excluded)."""
        return int(self.attention.sum())


def layout(batch: PairBatch, sharing: str = "auto") -> Layout:
    """The layout to run ``batch`` in under ``sharing`` (one of ``SHARING``)."""
    if sharing not in SHARING:
        raise ValueError(f"prefix sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    if sharing == "off" or batch.rejected_ids is None:
        return plain_layout(batch)
    forked = fork_layout(batch)
    if sharing == "on" or forked.ids.size <= AUTO_FORK_RATIO * 2 * batch.chosen_ids.size:
        return forked
    return plain_layout(batch)


def plain_layout(batch: PairBatch) -> Layout:
    ids, attention, mask = concat_sides(batch)
    return Layout(ids, attention, None, None, targets(ids, mask), shape=ids.shape)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def fork_layout(batch: PairBatch) -> Layout:
    """The shared-prefix layout of a preference batch (see the module docstring)."""
    assert batch.rejected_ids is not None and batch.rejected_mask is not None
    assert batch.rejected_attention_mask is not None
    pairs, width = batch.chosen_ids.shape
    lengths_c = batch.chosen_attention_mask.sum(1).astype(int)
    lengths_r = batch.rejected_attention_mask.sum(1).astype(int)
    rows = []
    for b in range(pairs):
        c, r = batch.chosen_ids[b, : lengths_c[b]], batch.rejected_ids[b, : lengths_r[b]]
        rows.append((c, r, common_prefix(c, r)))
    length = max(len(c) + len(r) - s for c, r, s in rows)
    ids = np.zeros((pairs, length), dtype=np.int64)
    positions = np.zeros((pairs, length), dtype=np.int64)
    segments = np.full((pairs, length), PAD_SEGMENT, dtype=np.int64)
    hidden: list[int] = []  # flat hidden row b*L + i that predicts each unique target
    target_ids: list[int] = []
    out: list[int] = []  # flat index into the (2B*T) plain matrix, per output value
    source: list[int] = []  # which unique target each output value is
    for b, (c, r, s) in enumerate(rows):
        lc, end = len(c), len(c) + len(r) - s
        ids[b, :lc], ids[b, lc:end] = c, r[s:]
        positions[b, :lc], positions[b, lc:end] = np.arange(lc), np.arange(s, len(r))
        segments[b, :s], segments[b, s:lc], segments[b, lc:end] = 0, 1, 2
        shared: dict[int, int] = {}  # position t < S -> its unique target
        for t in (np.flatnonzero(batch.chosen_mask[b, 1:]) + 1).tolist():
            if t < s:
                shared[t] = len(hidden)
            source.append(len(hidden))
            out.append(b * width + t)
            hidden.append(b * length + t - 1)
            target_ids.append(int(c[t]))
        for t in (np.flatnonzero(batch.rejected_mask[b, 1:]) + 1).tolist():
            out.append((pairs + b) * width + t)
            if t in shared:
                source.append(shared[t])
                continue
            source.append(len(hidden))
            hidden.append(b * length + (t - 1 if t <= s else lc + t - 1 - s))
            target_ids.append(int(r[t]))
    tg = Targets(
        hidden_index=np.array(hidden, dtype=np.int64),
        target_ids=np.array(target_ids, dtype=np.int64),
        out_index=np.array(out, dtype=np.int64),
        source=np.array(source, dtype=np.int64),
    )
    attention = (segments != PAD_SEGMENT).astype(np.float32)
    return Layout(ids, attention, positions, segments, tg, shape=(2 * pairs, width))


def fork_mask(segments: Any, order: Any) -> Any:
    """``mask[r, i, j]`` (R, L, L) bool, True where query i may attend to key j, from the
    segments (R, L) and ``order`` = 0..L-1, both arrays of the backend's own namespace (so the
    mask is built where it is used; only comparisons and broadcasting are needed)."""
    causal = order[None, :] <= order[:, None]  # (L, L): key j <= query i
    key, query = segments[:, None, :], segments[:, :, None]
    return causal[None, :, :] & ((key == 0) | (key == query))
