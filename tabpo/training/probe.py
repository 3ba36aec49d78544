"""Is tabpo's forward the model's own? Checked once at load, on a short probe sequence.

tabpo runs the decoder and the LM head itself (so the head sees only completion rows and a
pair can fork at its shared prefix). A model whose own forward does more than that, such as
Gemma-2's final logit soft-capping, would then be trained as another function without a
word. At load each backend scores ``probe_batch`` both ways, tabpo's log-prob path and the
library's own forward normalised in float64, and ``check_same_function`` refuses the model
if they differ by more than its dtype's rounding.
"""

from __future__ import annotations

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch

PROBE_LENGTH = 16
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15, "float16": 0.05, "float64": 1e-3}  # nats/token


def probe_ids(vocab: int) -> np.ndarray:
    """A fixed sequence of token ids spread over the vocabulary, (PROBE_LENGTH,)."""
    return (np.arange(1, PROBE_LENGTH + 1, dtype=np.int64) * 7919) % vocab


def probe_batch(vocab: int) -> PairBatch:
    """The probe as a completion-only batch: every token after the first is scored."""
    ids = probe_ids(vocab)[None]
    ones = np.ones(ids.shape, dtype=np.float32)
    mask = ones.copy()
    mask[:, 0] = 0.0
    return PairBatch(ids, None, ones, None, mask, None, mask.copy(), None, np.zeros(1, np.int64))


def library_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log pi(ids[t] | ids[:t]) for t >= 1 from the library's (L, V) logits, normalised in
    float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def check_same_function(ours: np.ndarray, library: np.ndarray, *, path: str, dtype: str) -> None:
    """A TabpoError unless the two per-token log-probs agree within ``dtype``'s rounding."""
    worst = float(np.abs(np.asarray(ours, np.float64) - library).max())
    if not np.isfinite(worst) or worst > TOLERANCE[dtype]:
        raise TabpoError(
            f"{path}: tabpo's forward and the model's own differ by {worst:.3g} nats per token "
            f"on a probe sequence (allowed {TOLERANCE[dtype]:g} in {dtype}): the model does "
            "something tabpo's forward does not reproduce (logit soft-capping, a sliding "
            "window, ...), so it is not supported"
        )
