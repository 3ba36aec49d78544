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

Whichever layout ran, a backend computes per-token values only at the U target rows, with
the LM head over ``head_chunks`` of them, and ``place`` puts them into the (N, T) matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tabpo.data.batching import PairBatch, concat_sides
from tabpo.losses.xp import Array, namespace

SHARING = ("auto", "on", "off")
AUTO_FORK_RATIO = 0.85
PAD_SEGMENT = -1
# float32 logits one LM-head chunk may hold (256 MB): 1365 rows of a 49k vocabulary
LOGITS_PER_CHUNK = 1 << 26


@dataclass(frozen=True)
class Targets:
    """Where the completion tokens of a forward are, for a gathered LM head.

    The log-prob of token t comes from the hidden state that precedes it, so a backend
    computes logits only for the U ``hidden_index`` rows of the flattened hidden states and
    takes the log-prob of ``target_ids``; value ``source[k]`` belongs at ``out_index[k]`` of
    the (N, T) matrix aligned with the masks (``Layout.placement``, ``place``). In the plain
    layout U = K and ``source`` is 0..K-1; the forked layout computes a token both sides
    share once and places it twice.
    """

    hidden_index: np.ndarray  # (U,) int64, flat hidden row, b*T + t - 1 in the plain layout
    target_ids: np.ndarray  # (U,) int64, the token each row predicts
    out_index: np.ndarray  # (K,) int64, flat index b*T + t into the (N, T) output
    source: np.ndarray  # (K,) int64, which of the U values goes to out_index[k]


def targets(ids: np.ndarray, mask: np.ndarray) -> Targets:
    """The completion positions of ``ids`` (N, T) under ``mask`` (N, T), row-major order."""
    rows, cols = np.nonzero(mask[:, 1:] > 0)  # position 0 is never a completion token
    cols = cols + 1
    width = ids.shape[1]
    return Targets(
        hidden_index=(rows * width + cols - 1).astype(np.int64),
        target_ids=ids[rows, cols].astype(np.int64),
        out_index=(rows * width + cols).astype(np.int64),
        source=np.arange(len(rows), dtype=np.int64),
    )


@dataclass(frozen=True)
class Layout:
    """ids (R, L) int64, attention (R, L) float32 (1 on tokens), positions (R, L) int64 and
    segments (R, L) int64 when forked (None: positions 0..L-1 and causal attention), the
    completion ``targets`` into the flattened (R*L) hidden rows, and ``shape`` (N, T) of
    the plain matrices the log-probs are placed into."""

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

    @property
    def placement(self) -> np.ndarray:
        """(N*T,) int64 for ``place``: 0 where no completion token sits, else 1 + the index
        of its value among the U computed ones (a token both sides share is read twice)."""
        index = np.zeros(self.shape[0] * self.shape[1], dtype=np.int64)
        index[self.targets.out_index] = self.targets.source + 1
        return index


def layout(batch: PairBatch, sharing: str = "auto") -> Layout:
    """The layout to run ``batch`` in under ``sharing`` (one of ``SHARING``)."""
    if sharing not in SHARING:
        raise ValueError(f"prefix sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    if sharing == "off" or batch.rejected_ids is None:
        return plain_layout(batch)
    rows = _fork_rows(batch)
    forked_size = batch.size * max(len(c) + len(r) - s for c, r, s in rows)
    if sharing == "on" or forked_size <= AUTO_FORK_RATIO * 2 * batch.chosen_ids.size:
        return fork_layout(batch, rows)
    return plain_layout(batch)


def plain_layout(batch: PairBatch) -> Layout:
    ids, attention, mask = concat_sides(batch)
    return Layout(ids, attention, None, None, targets(ids, mask), shape=ids.shape)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _fork_rows(batch: PairBatch) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per pair: the chosen and rejected token ids (unpadded) and their common prefix S."""
    assert batch.rejected_ids is not None and batch.rejected_attention_mask is not None
    lengths_c = batch.chosen_attention_mask.sum(1).astype(int)
    lengths_r = batch.rejected_attention_mask.sum(1).astype(int)
    rows = []
    for b in range(batch.size):
        c, r = batch.chosen_ids[b, : lengths_c[b]], batch.rejected_ids[b, : lengths_r[b]]
        rows.append((c, r, common_prefix(c, r)))
    return rows


def fork_layout(
    batch: PairBatch, rows: list[tuple[np.ndarray, np.ndarray, int]] | None = None
) -> Layout:
    """The shared-prefix layout of a preference batch (see the module docstring); ``rows``:
    ``_fork_rows(batch)`` when the caller already has them."""
    assert batch.rejected_mask is not None
    rows = rows if rows is not None else _fork_rows(batch)
    pairs, width = batch.chosen_ids.shape
    length = max(len(c) + len(r) - s for c, r, s in rows)
    ids = np.zeros((pairs, length), dtype=np.int64)
    positions = np.zeros((pairs, length), dtype=np.int64)
    segments = np.full((pairs, length), PAD_SEGMENT, dtype=np.int64)
    hidden, target_ids, out, source = [], [], [], []  # per pair, concatenated below
    unique = 0  # distinct targets so far
    for b, (c, r, s) in enumerate(rows):
        lc, end = len(c), len(c) + len(r) - s
        ids[b, :lc], ids[b, lc:end] = c, r[s:]
        positions[b, :lc], positions[b, lc:end] = np.arange(lc), np.arange(s, len(r))
        segments[b, :s], segments[b, s:lc], segments[b, lc:end] = 0, 1, 2
        tc = np.flatnonzero(batch.chosen_mask[b, 1:]) + 1  # completion positions, sorted
        tr = np.flatnonzero(batch.rejected_mask[b, 1:]) + 1
        shared = tr < s  # predicted from the shared prefix: the chosen side's value
        tn = tr[~shared]  # the rejected suffix: its own rows (the first from row S-1)
        hidden += [b * length + tc - 1, b * length + np.where(tn <= s, tn - 1, lc + tn - 1 - s)]
        target_ids += [c[tc], r[tn]]
        out += [b * width + tc, (pairs + b) * width + tr]
        own = np.empty(len(tr), dtype=np.int64)
        own[shared] = unique + np.searchsorted(tc, tr[shared])  # same prompt: tc holds them
        own[~shared] = unique + len(tc) + np.arange(len(tn))
        source += [unique + np.arange(len(tc)), own]
        unique += len(tc) + len(tn)
    flat = [np.concatenate(x).astype(np.int64) for x in (hidden, target_ids, out, source)]
    tg = Targets(hidden_index=flat[0], target_ids=flat[1], out_index=flat[2], source=flat[3])
    attention = (segments != PAD_SEGMENT).astype(np.float32)
    return Layout(ids, attention, positions, segments, tg, shape=(2 * pairs, width))


def fork_mask(segments: Any, order: Any) -> Any:
    """``mask[r, i, j]`` (R, L, L) bool, True where query i may attend to key j, from the
    segments (R, L) and ``order`` = 0..L-1, both arrays of the backend's own namespace (so the
    mask is built where it is used; only comparisons and broadcasting are needed)."""
    causal = order[None, :] <= order[:, None]  # (L, L): key j <= query i
    key, query = segments[:, None, :], segments[:, :, None]
    return causal[None, :, :] & ((key == 0) | (key == query))


def head_chunks(rows: int, vocab: int) -> list[slice]:
    """Slices of the U target rows for the LM head, each at most ``LOGITS_PER_CHUNK``
    float32 logits (rows x vocab), so (U, V) logits are never held at once."""
    step = max(1, LOGITS_PER_CHUNK // max(vocab, 1))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


def place(values: Array, placement: Array, shape: tuple[int, int]) -> Array:
    """Per-target values (U,) as the (N, T) matrix the losses read, 0 off the targets.

        out.flat[i] = [0, values...][placement[i]]

    A gather, differentiable in ``values`` on every namespace: the gradient of a value
    placed twice (a token both sides share) is the sum of both positions' gradients.
    ``placement`` is ``Layout.placement`` as an index array of ``values``' namespace.
    """
    xp = namespace(values)
    padded = xp.concat([xp.zeros_like(xp.sum(values, axis=0, keepdims=True)), values])
    return xp.reshape(xp.take(padded, placement, axis=0), shape)
