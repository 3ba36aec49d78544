"""One batch's decoder forward, and per-token log-probs and KL with the LM head on
completion rows only.

Shapes: N = 2B stacked sequences, T positions, H hidden, V vocabulary, K completion tokens,
U <= K of them distinct (the shared-prefix layout computes a token both sides share once,
``tabpo.data.layout``). A float32 log-softmax over (N, T, V) is never built: the head runs on
the U rows that predict completion tokens, over the core's ``head_chunks``, and the core's
``place`` puts the results into (N, T) matrices aligned with the masks.

The forked layout needs two things mlx-lm's attention does not take from its caller: a
custom mask and per-token positions. Both go in through the ``cache`` argument every
mlx-lm attention accepts: ``_ForkCache.make_mask`` returns the fork mask, its
``update_and_fetch`` keeps nothing, and for the duration of the forward each layer's RoPE is
wrapped so that it rotates every token by its own position (``mx.fast.rope`` takes one
offset per batch row, so tokens are laid out as rows of length 1).

    l_t  = z_t[y_t] - logsumexp(z_t)                           (z_t: logits of row t)
    KL_t = sum_v p_ref(v|s_t) (log p_ref(v|s_t) - log p_theta(v|s_t))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tabpo.backends._mlx_model import widened
from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch
from tabpo.data.layout import Targets, fork_mask, head_chunks, layout, place


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits of hidden rows ``h`` (K, H) -> (K, V), with the tied embedding if tied."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _log_softmax(model: nn.Module, rows: mx.array) -> mx.array:
    """float32 log-probs over the vocabulary (K, V); the matmul stays in the model's dtype,
    as transformers does, and the normalisation is done in float32 by ``vocab_logsumexp``."""
    logits = widened(lm_head(model, rows))
    return logits - vocab_logsumexp(logits)


# MLX's float32 reductions on the CPU accumulate one element after another, so a sum over a
# vocabulary of V entries errs in proportion to V (6e-5 at 49k, 3e-4 at 152k, always low:
# log-probs biased high). Reducing blocks of VOCAB_BLOCK first, then the block results,
# errs in proportion to VOCAB_BLOCK + V / VOCAB_BLOCK instead.
VOCAB_BLOCK = 256


def _blocks(x: mx.array, fill: float) -> mx.array:
    """(K, V) as (K, ceil(V / VOCAB_BLOCK), VOCAB_BLOCK), the tail padded with ``fill``."""
    k, v = x.shape
    pad = -v % VOCAB_BLOCK
    if pad:
        x = mx.concatenate([x, mx.full((k, pad), fill, dtype=x.dtype)], axis=-1)
    return x.reshape(k, -1, VOCAB_BLOCK)


def vocab_logsumexp(logits: mx.array) -> mx.array:
    """``log sum_v exp(z_v)`` over the last axis of (K, V), (K, 1), two-stage."""
    per_block = mx.logsumexp(_blocks(logits, -float("inf")), axis=-1)  # (K, V / block)
    return mx.logsumexp(per_block, axis=-1, keepdims=True)


def vocab_sum(x: mx.array) -> mx.array:
    """``sum_v x_v`` over the last axis of (K, V), (K,), two-stage."""
    return mx.sum(mx.sum(_blocks(x, 0.0), axis=-1), axis=-1)


class Forward:
    """A batch in its layout (``tabpo.data.layout``), ready to run through a model's decoder."""

    def __init__(self, batch: PairBatch, sharing: str) -> None:
        self.layout = lay = layout(batch, sharing)
        self.targets = lay.targets
        self.shape = lay.shape
        self.placement = mx.array(lay.placement)
        self.ids = mx.array(lay.ids.astype(np.int32))
        self.mask: mx.array | None = None
        self.positions: mx.array | None = None
        if lay.segments is not None and lay.positions is not None:
            segments = mx.array(lay.segments.astype(np.int32))
            self.mask = fork_mask(segments, mx.arange(segments.shape[1]))[:, None]  # (R,1,L,L)
            self.positions = mx.array(lay.positions.astype(np.int32))

    def hidden(self, model: nn.Module) -> mx.array:
        """Final hidden states (R, L, H) of ``model``'s decoder on this layout."""
        decoder = model.model
        if self.mask is None or self.positions is None:
            return decoder(self.ids)
        cache = [_ForkCache(self.mask)] * len(decoder.layers)
        with _positioned_rope(decoder.layers, self.positions):
            return decoder(self.ids, cache=cache)


class _ForkCache:
    """A stand-in KV cache that hands mlx-lm's attention the fork mask and caches nothing."""

    offset = 0  # ignored by the positioned RoPE

    def __init__(self, mask: mx.array) -> None:
        self.mask = mask

    def make_mask(self, n: int, *, return_array: bool = False, window_size: Any = None) -> Any:
        if window_size is not None:
            raise TabpoError(
                "this model has sliding-window attention layers, which the shared-prefix "
                "forward cannot mask: use --prefix-sharing off"
            )
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


class _PositionedRope(nn.Module):
    """``inner`` RoPE applied at per-token positions (R, L) instead of 0..L-1 + offset."""

    def __init__(self, inner: nn.Module, positions: mx.array) -> None:
        super().__init__()
        self._inner, self._positions = inner, positions

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        r, heads, n, d = x.shape  # (R, heads, L, D) -> one row of length 1 per token
        tokens = x.transpose(0, 2, 1, 3).reshape(r * n, heads, 1, d)
        out = self._inner(tokens, offset=self._positions.reshape(-1))
        return out.reshape(r, n, heads, d).transpose(0, 2, 1, 3)


@contextmanager
def _positioned_rope(layers: list[nn.Module], positions: mx.array) -> Iterator[None]:
    """Every layer's ``self_attn.rope`` wrapped by ``_PositionedRope`` inside the block."""
    originals = [layer.self_attn.rope for layer in layers]
    try:
        for layer, rope in zip(layers, originals, strict=True):
            layer.self_attn.rope = _PositionedRope(rope, positions)
        yield
    finally:
        for layer, rope in zip(layers, originals, strict=True):
            layer.self_attn.rope = rope


def completion_rows(hidden: mx.array, tg: Targets) -> mx.array:
    """The hidden states (U, H) that predict the completion tokens."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (R*L, H)
    return flat[mx.array(tg.hidden_index)]


def token_logps(
    model: nn.Module,
    hidden: mx.array,
    fwd: Forward,
    ref: tuple[nn.Module, mx.array] | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Log-probs (N, T) of the completion tokens and, given ``ref = (ref_model, ref_rows)``
    (the reference's completion rows), the per-position KL (N, T) to the reference.

    The reference side is under ``stop_gradient``: only pi_theta is differentiated. Each
    chunk runs under ``mx.checkpoint``, so its (k, V) float32 logits are rebuilt in the
    backward instead of being kept for it (the head's trained weights go through the
    checkpoint as inputs, which is how it differentiates them).
    """
    tg = fwd.targets
    rows = completion_rows(hidden, tg)  # (U, H)
    target = mx.array(tg.target_ids)[:, None]  # (U, 1)
    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head

    def chunk(y: mx.array) -> Any:  # the targets stay outside: no gradient for indices
        def run(params: Any, h: mx.array, *ref_h: mx.array) -> list[mx.array]:
            head.update(params)
            logp = _log_softmax(model, h)  # (k, V)
            out = [mx.take_along_axis(logp, y, axis=-1)[:, 0]]
            if ref is not None:
                ref_logp = mx.stop_gradient(_log_softmax(ref[0], ref_h[0]))
                out.append(vocab_sum(mx.exp(ref_logp) * (ref_logp - logp)))
            return out

        return mx.checkpoint(run)

    logps, kls = [], []
    for part in head_chunks(len(tg.target_ids), model.args.vocab_size):
        extra = (ref[1][part],) if ref is not None else ()
        out = chunk(target[part])(head.trainable_parameters(), rows[part], *extra)
        logps.append(out[0])
        kls.extend(out[1:])
    return _placed(logps, fwd), _placed(kls, fwd) if ref is not None else None


def _placed(values: list[mx.array], fwd: Forward) -> mx.array:
    """The chunks' (U,) values as the (N, T) float32 matrix (``place``)."""
    flat = mx.concatenate(values) if values else mx.zeros((0,), dtype=mx.float32)
    return place(flat, fwd.placement, fwd.shape)


def as_mx(x: np.ndarray | None) -> mx.array | None:
    return None if x is None else mx.array(np.asarray(x, dtype=np.float32))
