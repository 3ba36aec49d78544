"""DPO and the variants that share its log-ratio margin (docs/method.md §3).

    h+ = sum_t m_t (l_t - r_t) on the chosen, h- likewise on the rejected, z = h+ - h-

Every function returns the loss of each pair, shape (B,), and the TRL reward metrics with
``rewards/* = beta * h``. Token weights are ignored: these baselines are sequence-level.
"""

from __future__ import annotations

import math

from tabpo.losses.inputs import PairInputs
from tabpo.losses.metrics import reward_metrics
from tabpo.losses.registry import Metrics, check_choice, check_range, register
from tabpo.losses.xp import Array, log_sigmoid, relu, stop_gradient


def _margin(p: PairInputs, beta: float) -> tuple[Array, Metrics]:
    check_range("beta", beta, 0.0, math.inf)
    return p.h_chosen - p.h_rejected, reward_metrics(p, beta * p.h_chosen, beta * p.h_rejected)


def _smoothing(label_smoothing: float) -> None:
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, closed="low")


@register("dpo")
def dpo(p: PairInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Array, Metrics]:
    """DPO (sigmoid), with cDPO's label smoothing eps.

        L = -(1 - eps) log s(beta z) - eps log s(-beta z)

    Rafailov et al. 2023, https://arxiv.org/abs/2305.18290; cDPO: Mitchell 2023.
    """
    _smoothing(label_smoothing)
    z, metrics = _margin(p, beta)
    xp = p.xp
    loss = -(1 - label_smoothing) * log_sigmoid(beta * z, xp)
    if label_smoothing:
        loss = loss - label_smoothing * log_sigmoid(-beta * z, xp)
    return loss, metrics


@register("robust")
def robust(
    p: PairInputs, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Array, Metrics]:
    """Robust DPO: an unbiased loss under preference-label noise of rate eps.

        L = [-(1 - eps) log s(beta z) + eps log s(-beta z)] / (1 - 2 eps)

    Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409
    """
    _smoothing(label_smoothing)
    z, metrics = _margin(p, beta)
    xp, eps = p.xp, label_smoothing
    loss = (-(1 - eps) * log_sigmoid(beta * z, xp) + eps * log_sigmoid(-beta * z, xp)) / (
        1 - 2 * eps
    )
    return loss, metrics


@register("hinge")
def hinge(p: PairInputs, *, beta: float = 0.1) -> tuple[Array, Metrics]:
    """Hinge (SLiC): L = relu(1 - beta z).

    Zhao et al. 2023, https://arxiv.org/abs/2305.10425
    """
    z, metrics = _margin(p, beta)
    return relu(1 - beta * z, p.xp), metrics


@register("ipo")
def ipo(p: PairInputs, *, beta: float = 0.1, normalize: bool = True) -> tuple[Array, Metrics]:
    """IPO: L = (z' - 1/(2 beta))^2.

    normalize=True (TRL's current form): z' = h+/|y+| - h-/|y-|; normalize=False (the
    paper's and the TAB-PO authors' form): z' = z.
    Azar et al. 2023, https://arxiv.org/abs/2310.12036
    """
    z, metrics = _margin(p, beta)
    if normalize:
        z = p.h_chosen / p.chosen_len - p.h_rejected / p.rejected_len
    return (z - 1 / (2 * beta)) ** 2, metrics


@register("cal_dpo")
def cal_dpo(p: PairInputs, *, beta: float = 0.1) -> tuple[Array, Metrics]:
    """Cal-DPO: DPO on the raw log-ratios plus calibration of each to +-1/(2 beta).

        L = -log s(h+ - h-) + 0.5 [(h+ - 1/(2 beta))^2 + (h- + 1/(2 beta))^2]

    Xiao et al. 2024, https://arxiv.org/abs/2412.14516
    """
    z, metrics = _margin(p, beta)
    target = 1 / (2 * beta)
    calib = (p.h_chosen - target) ** 2 + (p.h_rejected + target) ** 2
    return -log_sigmoid(z, p.xp) + 0.5 * calib, metrics


@register("dpop")
def dpop(p: PairInputs, *, beta: float = 0.1, lam: float = 1.0) -> tuple[Array, Metrics]:
    """DPO-Positive (Smaug): penalise the chosen log-ratio falling below the reference.

        L = -log s(beta (z - lam max(0, -h+)))

    Pal et al. 2024, https://arxiv.org/abs/2402.13228
    """
    check_range("lam", lam, 0.0, math.inf, closed="low")
    z, metrics = _margin(p, beta)
    xp = p.xp
    return -log_sigmoid(beta * (z - lam * relu(-p.h_chosen, xp)), xp), metrics


@register("rpo")
def rpo(p: PairInputs, *, beta: float = 0.1, alpha: float = 1.0) -> tuple[Array, Metrics]:
    """RPO: DPO plus alpha times the token-mean NLL of the chosen completion.

        L = -log s(beta z) + alpha * (-(1/|y+|) sum_t m_t l_t(y+))

    Pang et al. 2024, https://arxiv.org/abs/2404.19733
    """
    check_range("alpha", alpha, 0.0, math.inf, closed="low")
    z, metrics = _margin(p, beta)
    nll = -p.mean_logps_chosen
    metrics["nll_loss"] = p.xp.mean(nll)
    return -log_sigmoid(beta * z, p.xp) + alpha * nll, metrics


@register("tdpo", needs_kl=True)
def tdpo(
    p: PairInputs, *, beta: float = 0.1, alpha: float | None = None, variant: str = "tdpo2"
) -> tuple[Array, Metrics]:
    """TDPO: DPO with the sequential KL to the reference as a token-level regulariser.

        KL+- = sum_t m_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))     (full vocabulary)
        TDPO2: L = -log s(beta (z - alpha (KL- - sg(KL+))))      alpha 0.5
        TDPO1: the same with alpha 1 and no stop-gradient on KL+

    Zeng et al. 2024, https://arxiv.org/abs/2404.11999
    """
    check_choice("variant", variant, ("tdpo1", "tdpo2"))
    if alpha is None:
        alpha = 1.0 if variant == "tdpo1" else 0.5
    check_range("alpha", alpha, 0.0, math.inf, closed="low")
    z, metrics = _margin(p, beta)
    xp = p.xp
    kl_c, kl_r = xp.sum(p.chosen_kl, axis=-1), xp.sum(p.rejected_kl, axis=-1)
    if variant == "tdpo2":
        kl_c = stop_gradient(kl_c)
    metrics["kl/chosen"] = xp.mean(kl_c)
    metrics["kl/rejected"] = xp.mean(kl_r)
    return -log_sigmoid(beta * (z - alpha * (kl_r - kl_c)), xp), metrics
