"""Losses that need no reference model: SimPO, ORPO and plain SFT (docs/method.md §3).

``a = sum_t m_t l_t / |y|`` is the token-mean log-prob of a completion, shape (B,).
"""

from __future__ import annotations

import math

from tabpo.losses.inputs import PairInputs
from tabpo.losses.metrics import logps_metrics, reward_metrics
from tabpo.losses.registry import Metrics, check_range, register
from tabpo.losses.xp import Array, log1mexp, log_sigmoid


@register("simpo", reference_free=True)
def simpo(p: PairInputs, *, beta: float = 0.5, gamma: float = 0.5) -> tuple[Array, Metrics]:
    """SimPO: length-normalised, reference-free margin with a target gap gamma.

        L = -log s(beta (a+ - a-) - gamma)

    Meng et al. 2024, https://arxiv.org/abs/2405.14734. rewards/* = beta * a.
    """
    check_range("beta", beta, 0.0, math.inf)
    a_c, a_r = p.mean_logps_chosen, p.mean_logps_rejected
    metrics = reward_metrics(p, beta * a_c, beta * a_r)
    return -log_sigmoid(beta * (a_c - a_r) - gamma, p.xp), metrics


@register("orpo", reference_free=True)
def orpo(p: PairInputs, *, lam: float = 0.1) -> tuple[Array, Metrics]:
    """ORPO: SFT on the chosen plus an odds-ratio preference term.

        log_odds = (a+ - a-) - [log(1 - e^a+) - log(1 - e^a-)]
        L        = -a+ - lam log s(log_odds)

    A mean log-prob that rounds to 0 would make log(1 - e^a) -inf; ``log1mexp`` clamps a
    to -2^-23 first, float32's resolution there.
    Hong et al. 2024, https://arxiv.org/abs/2403.07691. rewards/* = lam * a (TRL's).
    """
    check_range("lam", lam, 0.0, math.inf, closed="low")
    xp = p.xp
    a_c, a_r = p.mean_logps_chosen, p.mean_logps_rejected
    log_odds = (a_c - a_r) - (log1mexp(a_c, xp) - log1mexp(a_r, xp))
    ratio = log_sigmoid(log_odds, xp)
    metrics = reward_metrics(p, lam * a_c, lam * a_r)
    metrics |= {
        "nll_loss": xp.mean(-a_c),
        "log_odds_ratio": xp.mean(ratio),
        "log_odds_chosen": xp.mean(log_odds),
    }
    return -a_c - lam * ratio, metrics


@register("sft", reference_free=True, needs_pairs=False)
def sft(p: PairInputs) -> tuple[Array, Metrics]:
    """SFT: token-mean NLL of the chosen completion, L = -(1/|y+|) sum_t m_t l_t(y+).

    The mean is per pair, then over pairs (so k accumulated batches of B equal one of kB).
    The rejected completion may be None.
    """
    metrics = logps_metrics(p)
    metrics["nll_loss"] = p.xp.mean(-p.mean_logps_chosen)
    return -p.mean_logps_chosen, metrics
