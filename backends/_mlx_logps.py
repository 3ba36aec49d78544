"""Per-token log-probs and KL from hidden states, with the LM head on completion rows only.

Shapes: N = 2B stacked sequences, T positions, H hidden, V vocabulary, K completion tokens.
A float32 log-softmax over (N, T, V) is never built: the head runs on the K rows that
predict completion tokens (``tabpo.batching.targets``), a chunk of rows at a time, and the
results are scattered back into a zero (N, T) matrix aligned with the masks.

    l_t  = z_t[y_t] - logsumexp(z_t)                           (z_t: logits of row t)
    KL_t = sum_v p_ref(v|s_t) (log p_ref(v|s_t) - log p_theta(v|s_t))
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tabpo.batching import Targets

LOGITS_PER_CHUNK = 1 << 24  # float32 logits held at once per chunk (64 MB)


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits of hidden rows ``h`` (K, H) -> (K, V), with the tied embedding if tied."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _log_softmax(model: nn.Module, rows: mx.array) -> mx.array:
    """float32 log-probs over the vocabulary (K, V); the matmul stays in the model's dtype,
    as transformers does, and the normalisation is done in float32."""
    logits = lm_head(model, rows).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _chunks(k: int, vocab: int) -> list[slice]:
    step = max(1, LOGITS_PER_CHUNK // max(vocab, 1))
    return [slice(s, min(s + step, k)) for s in range(0, k, step)]


def completion_rows(hidden: mx.array, tg: Targets) -> mx.array:
    """The hidden states (K, H) that predict the completion tokens."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N*T, H)
    return flat[mx.array(tg.hidden_index)]


def scatter(values: list[mx.array], tg: Targets, shape: tuple[int, int]) -> mx.array:
    """Per-token values (K,) placed at their positions in a zero (N, T) float32 matrix; the
    scatter-add is differentiable with respect to ``values``."""
    out = mx.zeros((shape[0] * shape[1],), dtype=mx.float32)
    if values:
        out = out.at[mx.array(tg.out_index)].add(mx.concatenate(values))
    return out.reshape(shape)


def token_logps(
    model: nn.Module,
    hidden: mx.array,
    tg: Targets,
    ref: tuple[nn.Module, mx.array] | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Log-probs (N, T) of the completion tokens and, given ``ref = (ref_model, ref_rows)``
    (the reference's completion rows), the per-position KL (N, T) to the reference.

    The reference side is under ``stop_gradient``: only pi_theta is differentiated.
    """
    rows = completion_rows(hidden, tg)  # (K, H)
    target = mx.array(tg.target_ids)[:, None]  # (K, 1)
    vocab = model.args.vocab_size
    logps, kls = [], []
    for part in _chunks(len(tg.target_ids), vocab):
        logp = _log_softmax(model, rows[part])  # (k, V)
        logps.append(mx.take_along_axis(logp, target[part], axis=-1)[:, 0])
        if ref is not None:
            ref_model, ref_rows = ref
            ref_logp = mx.stop_gradient(_log_softmax(ref_model, ref_rows[part]))
            kls.append(mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1))
    shape = hidden.shape[:2]
    return scatter(logps, tg, shape), scatter(kls, tg, shape) if ref is not None else None


def as_mx(x: np.ndarray | None) -> mx.array | None:
    return None if x is None else mx.array(np.asarray(x, dtype=np.float32))
