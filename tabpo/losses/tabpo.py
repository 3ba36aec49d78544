"""TAB-PO: token-weighted, reference-adjusted preference term plus a conditional barrier.

Token-Adaptive Barrier Preference Optimization (arXiv 2603.00025). Shapes: (B, T) in,
(B,) per pair. See docs/method.md §1-2 for the formulas and where we differ from the
reference implementation.
"""

from __future__ import annotations

import math

from tabpo.losses.inputs import PairInputs
from tabpo.losses.metrics import reward_metrics
from tabpo.losses.registry import Metrics, check_choice, check_range, register
from tabpo.losses.xp import Array, log_sigmoid, sigmoid


def normalize_weights(weights: Array, mask: Array, *, xp) -> Array:
    """``w~_t = w_t m_t T / max(sum_s w_s m_s, 1e-6)`` with ``T = max(sum_t m_t, 1)``.

    The mean of ``w~`` over completion tokens is exactly 1, so weights reshape the score
    without changing its scale.
    """
    wm = weights * mask
    count = xp.maximum(xp.sum(mask, axis=-1, keepdims=True), 1.0)
    total = xp.maximum(xp.sum(wm, axis=-1, keepdims=True), 1e-6)
    return wm * count / total


def barrier(logps: Array, weights: Array, mask: Array, *, tau: float, xp) -> tuple[Array, Array]:
    """Gated, weighted NLL of the chosen tokens the policy is unsure of; (B,) and the gate.

        g_t = m_t * 1[l_t < log tau]
        B   = sum_t w_t g_t (-l_t) / max(sum_t w_t g_t, 1)

    ``weights`` are already normalised (v1) or the mask itself (v2: a count of gated
    tokens). The gate is a comparison, so no gradient flows through it.
    """
    gate = xp.astype(logps < math.log(tau), logps.dtype) * mask
    num = xp.sum(weights * gate * -logps, axis=-1)
    den = xp.maximum(xp.sum(weights * gate, axis=-1), 1.0)
    return num / den, gate


@register("tabpo")
def tabpo(
    p: PairInputs,
    *,
    beta: float = 0.5,
    tau: float = 0.66,
    barrier_weight: float = 0.5,
    variant: str = "v1",
) -> tuple[Array, Metrics]:
    """TAB-PO: -log s(beta * Delta) + lambda * B (v1: weighted means; v2: plain sums).

        S(y)   = (1/T) sum_t w~_t l_t,   S_ref(y) = (1/T) sum_t w~_t r_t
        Delta  = [S(y+) - S(y-)] - [S_ref(y+) - S_ref(y-)]
        L_pref = -log s(beta * Delta)
        g_t    = m_t 1[l_t(y+) < log tau]
        B      = sum_t w~_t g_t (-l_t(y+)) / max(sum_t w~_t g_t, 1)
        L      = L_pref + lambda * B              (per pair; lambda = barrier_weight)

    v2: w = 1, S(y) = sum_t m_t l_t (a sum, not a mean), B normalised by max(sum_t g_t, 1).
    Defaults are the reference implementation's: beta 0.5, tau 0.66, lambda 0.5.
    """
    xp = p.xp
    check_range("beta", beta, 0.0, math.inf)
    check_range("tau", tau, 0.0, 1.0, closed="high")
    check_range("barrier_weight", barrier_weight, 0.0, math.inf, closed="low")
    check_choice("variant", variant, ("v1", "v2"))

    if variant == "v1":
        w_c = normalize_weights(p.chosen_weights, p.chosen_mask, xp=xp)
        w_r = normalize_weights(p.rejected_weights, p.rejected_mask, xp=xp)
        len_c, len_r = p.chosen_len, p.rejected_len
    else:
        w_c, w_r = p.chosen_mask, p.rejected_mask
        len_c = len_r = 1.0

    def score(logps: Array, w: Array, length) -> Array:
        return xp.sum(w * logps, axis=-1) / length

    s_c, s_r = score(p.policy_chosen, w_c, len_c), score(p.policy_rejected, w_r, len_r)
    ref_c, ref_r = score(p.ref_chosen, w_c, len_c), score(p.ref_rejected, w_r, len_r)
    delta = (s_c - s_r) - (ref_c - ref_r)  # (B,)
    pref = -log_sigmoid(beta * delta, xp)
    bar, gate = barrier(p.policy_chosen, w_c, p.chosen_mask, tau=tau, xp=xp)

    metrics = reward_metrics(p, beta * (s_c - ref_c), beta * (s_r - ref_r))
    metrics |= {
        "loss/pref": xp.mean(pref),
        "loss/barrier": barrier_weight * xp.mean(bar),
        "barrier/active_frac": xp.sum(gate) / xp.maximum(xp.sum(p.chosen_mask), 1.0),
        "policy/prob_chosen": xp.mean(xp.exp(s_c)),
        "pref/p": xp.mean(sigmoid(beta * delta, xp)),
        "delta/min": xp.min(delta),
        "delta/mean": xp.mean(delta),
        "delta/max": xp.max(delta),
    }
    return pref + barrier_weight * bar, metrics
