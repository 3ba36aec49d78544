"""Hand-worked NumPy checks of every loss (docs/method.md §2-3); derivations in the docstrings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tabpo import losses

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def neg_log_sigmoid(x: float) -> float:
    """-log s(x) = log(1 + e^-x)."""
    return softplus(-x)


def pair_fixture():
    """One pair, T = 3, the first column is prompt (mask 0).

    chosen:   l = [_, -1, -2], r = [_, -1.5, -2.5]  ->  h+ = (-3) - (-4) = 1
    rejected: l = [_, -2, -1], r = [_, -1, -1]      ->  h- = (-3) - (-2) = -1
    z = h+ - h- = 2; |y+| = |y-| = 2
    """
    pc = np.array([[9.0, -1.0, -2.0]])
    rc = np.array([[9.0, -1.5, -2.5]])
    pr = np.array([[9.0, -2.0, -1.0]])
    rr = np.array([[9.0, -1.0, -1.0]])
    m = np.array([[0.0, 1.0, 1.0]])
    return pc, pr, rc, rr, m, m


def value(name, *args, **hp):
    loss, metrics = losses.get(name)(*args, **hp)
    return float(loss), {k: float(v) for k, v in metrics.items()}


# --- DPO family -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "robust", "dpop", "rpo", "tdpo"])
def test_policy_equal_to_reference_gives_ln2(name):
    """h+ = h- = 0 -> -log s(0) = ln 2 (rpo adds its NLL, tdpo zero KL)."""
    rng = np.random.default_rng(0)
    pc, pr = -rng.random((4, 5)), -rng.random((4, 5))
    m = np.ones((4, 5))
    extra = {}
    if name == "tdpo":
        extra = {"chosen_kl": np.zeros((4, 5)), "rejected_kl": np.zeros((4, 5))}
    loss, metrics = value(name, pc, pr, pc, pr, m, m, beta=0.3, **extra)
    nll = float(np.mean(-pc.mean(axis=1))) if name == "rpo" else 0.0
    assert loss == pytest.approx(LN2 + nll, rel=1e-12)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # ties do not count as wins


def test_dpo_hand_worked():
    """beta 0.5, z = 2: L = -log s(1) = log(1 + e^-1) = 0.313262.

    rewards/chosen = 0.5 * 1, rewards/rejected = 0.5 * -1, margin 1, accuracy 1;
    logps/chosen = -1 - 2 = -3 (sequence sum, prompt column masked).
    """
    loss, m = value("dpo", *pair_fixture(), beta=0.5)
    assert loss == pytest.approx(0.3132616875, rel=1e-9)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/margins"] == pytest.approx(1.0)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-3.0)
    assert m["logps/rejected"] == pytest.approx(-3.0)


def test_cdpo_label_smoothing():
    """eps 0.1, beta 0.5, z = 2: 0.9 log(1+e^-1) + 0.1 log(1+e^1)."""
    want = 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)
    loss, _ = value("dpo", *pair_fixture(), beta=0.5, label_smoothing=0.1)
    assert loss == pytest.approx(want, rel=1e-12)


def test_robust():
    """eps 0.1, beta 0.5, z = 2: [0.9 log(1+e^-1) - 0.1 log(1+e^1)] / 0.8."""
    want = (0.9 * softplus(-1.0) - 0.1 * softplus(1.0)) / 0.8
    loss, _ = value("robust", *pair_fixture(), beta=0.5, label_smoothing=0.1)
    assert loss == pytest.approx(want, rel=1e-12)


def test_hinge():
    """relu(1 - beta z): beta 0.1 -> 0.8; beta 1 -> relu(-1) = 0."""
    assert value("hinge", *pair_fixture(), beta=0.1)[0] == pytest.approx(0.8)
    assert value("hinge", *pair_fixture(), beta=1.0)[0] == 0.0


def test_ipo_normalised_and_not():
    """beta 0.5 -> target 1/(2 beta) = 1.

    normalised: z' = 1/2 - (-1)/2 = 1 -> (1 - 1)^2 = 0; unnormalised: z = 2 -> 1.
    """
    assert value("ipo", *pair_fixture(), beta=0.5)[0] == pytest.approx(0.0, abs=1e-15)
    assert value("ipo", *pair_fixture(), beta=0.5, normalize=False)[0] == pytest.approx(1.0)


def test_cal_dpo():
    """beta 0.5 -> target 1: -log s(2) + 0.5[(1 - 1)^2 + (-1 + 1)^2] = log(1 + e^-2);
    beta 0.25 -> target 2: log(1 + e^-2) + 0.5[1 + 1] = log(1 + e^-2) + 1."""
    assert value("cal_dpo", *pair_fixture(), beta=0.5)[0] == pytest.approx(softplus(-2.0))
    assert value("cal_dpo", *pair_fixture(), beta=0.25)[0] == pytest.approx(softplus(-2.0) + 1)


def test_dpop_penalises_chosen_below_reference():
    """Chosen below the reference: l+ = [_, -2, -2], r+ = [_, -1.5, -1.5] -> h+ = -1,
    h- = -1 as before, z = 0; lam 1: -log s(beta (0 - 1 * 1)) with beta 0.5 = log(1+e^0.5).
    With h+ > 0 (the fixture) DPOP equals DPO."""
    pc, pr, rc, rr, m, _ = pair_fixture()
    pc2 = np.array([[9.0, -2.0, -2.0]])
    rc2 = np.array([[9.0, -1.5, -1.5]])
    assert value("dpop", pc2, pr, rc2, rr, m, m, beta=0.5)[0] == pytest.approx(softplus(0.5))
    assert value("dpop", pc, pr, rc, rr, m, m, beta=0.5)[0] == pytest.approx(softplus(-1.0))


def test_rpo_adds_token_mean_nll():
    """-log s(0.5 * 2) + alpha * (1 + 2)/2 with alpha 0.5 -> log(1+e^-1) + 0.75."""
    loss, m = value("rpo", *pair_fixture(), beta=0.5, alpha=0.5)
    assert loss == pytest.approx(softplus(-1.0) + 0.75)
    assert m["nll_loss"] == pytest.approx(1.5)


def test_tdpo():
    """KL+ = 0.1 + 0.3 = 0.4 (prompt column ignored), KL- = 0.2 + 0.2 = 0.4 + 0.0 ...

    chosen_kl = [5, 0.1, 0.3] -> KL+ = 0.4; rejected_kl = [5, 0.5, 0.5] -> KL- = 1.0.
    TDPO2 (alpha 0.5, beta 0.5): -log s(0.5 (2 - 0.5 (1.0 - 0.4))) = log(1 + e^-0.85).
    TDPO1 (alpha 1): -log s(0.5 (2 - 0.6)) = log(1 + e^-0.7).
    """
    kl = {"chosen_kl": np.array([[5.0, 0.1, 0.3]]), "rejected_kl": np.array([[5.0, 0.5, 0.5]])}
    loss2, m = value("tdpo", *pair_fixture(), beta=0.5, **kl)
    assert loss2 == pytest.approx(softplus(-0.85))
    assert m["kl/chosen"] == pytest.approx(0.4)
    assert m["kl/rejected"] == pytest.approx(1.0)
    loss1, _ = value("tdpo", *pair_fixture(), beta=0.5, variant="tdpo1", **kl)
    assert loss1 == pytest.approx(softplus(-0.7))


# --- reference-free ---------------------------------------------------------------------


def test_simpo_reference_free():
    """a+ = (-1 - 2)/2 = -1.5 = a-; beta 0.5, gamma 0.5: -log s(0 - 0.5) = log(1 + e^0.5).
    References are not needed: None is accepted."""
    pc, pr, _, _, m, _ = pair_fixture()
    loss, metrics = value("simpo", pc, pr, None, None, m, m)
    assert loss == pytest.approx(softplus(0.5))
    assert metrics["rewards/chosen"] == pytest.approx(0.5 * -1.5)


def test_orpo():
    """a+ = mean(-0.1, -0.3) = -0.2; a- = mean(-1, -3) = -2; lam 0.1.

    log_odds = (a+ - a-) - [log(1 - e^a+) - log(1 - e^a-)]
    L = -a+ - lam log s(log_odds)
    """
    pc = np.array([[-0.1, -0.3]])
    pr = np.array([[-1.0, -3.0]])
    m = np.ones((1, 2))
    a_c, a_r = -0.2, -2.0
    log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
    want = 0.2 + 0.1 * neg_log_sigmoid(log_odds)
    loss, metrics = value("orpo", pc, pr, None, None, m, m)
    assert loss == pytest.approx(want, rel=1e-12)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds)


@pytest.mark.parametrize("a_chosen", [0.0, 1e-9, -1e-12])
def test_orpo_stays_finite_where_a_mean_log_prob_rounds_to_zero(a_chosen):
    """a+ = 0 exactly (or a rounding error either side of it) makes log(1 - e^a+) = -inf
    (NaN above 0); the loss is its value at the clamp a+ = -2^-23 instead:
    log(1 - e^a+) = log(2^-23) to first order, log_odds = (a+ - a-) - [log 2^-23 - log(1 -
    e^a-)], and L = -a+ - 0.1 log s(log_odds), finite, with a finite gradient."""
    torch = pytest.importorskip("torch")
    a_r, eps = -2.0, 2.0**-23
    log_odds = (0.0 - a_r) - (math.log(eps) - math.log(1 - math.exp(a_r)))
    want = -a_chosen + 0.1 * neg_log_sigmoid(log_odds)
    m = np.ones((1, 2))
    loss, _ = value("orpo", np.full((1, 2), a_chosen), np.full((1, 2), a_r), None, None, m, m)
    assert loss == pytest.approx(want, rel=1e-6)
    pc = torch.full((1, 2), a_chosen, dtype=torch.float32, requires_grad=True)
    loss, _ = losses.get("orpo")(pc, torch.full((1, 2), a_r), None, None, torch.ones(1, 2),
                                 torch.ones(1, 2))  # fmt: skip
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(pc.grad).all()


def test_sft_is_per_pair_token_mean_then_pair_mean():
    """Pair 1: tokens -1, -2 -> NLL 1.5; pair 2: token -3 -> NLL 3; loss (1.5 + 3)/2 = 2.25,
    not the batch token mean 6/3 = 2 (so accumulated batches equal one big batch)."""
    pc = np.array([[9.0, -1.0, -2.0], [9.0, 9.0, -3.0]])
    m = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    loss, metrics = value("sft", pc, None, None, None, m, None)
    assert loss == pytest.approx(2.25)
    assert metrics["logps/chosen"] == pytest.approx((-3.0 - 3.0) / 2)


# --- TAB-PO -----------------------------------------------------------------------------


def tabpo_fixture():
    """T = 3, all completion tokens.

    chosen:   l = [-0.1, -1.0, -0.2], r = [-0.1, -2.0, -0.2], w = [1, 2, 1]
              w~ = w * 3 / 4 = [0.75, 1.5, 0.75]
              S+     = (0.75 * -0.1 + 1.5 * -1.0 + 0.75 * -0.2) / 3 = -1.725 / 3 = -0.575
              S_ref+ = (-0.075 - 3.0 - 0.15) / 3 = -1.075
    rejected: l = r = [-0.5, -0.5, -0.5], w = 1 -> S- = S_ref- = -0.5
    Delta = (-0.575 + 0.5) - (-1.075 + 0.5) = 0.5
    """
    pc = np.array([[-0.1, -1.0, -0.2]])
    rc = np.array([[-0.1, -2.0, -0.2]])
    pr = rr = np.full((1, 3), -0.5)
    m = np.ones((1, 3))
    return (pc, pr, rc, rr, m, m), {"chosen_weights": np.array([[1.0, 2.0, 1.0]])}


def test_tabpo_hand_worked_defaults():
    """beta 0.5: L_pref = -log s(0.25) = log(1 + e^-0.25).

    tau 0.66, log tau = -0.4155: only l = -1.0 is gated; B = 1.5 * 1.0 / max(1.5, 1) = 1.
    L = L_pref + 0.5 * 1; active_frac = 1/3; prob_chosen = e^-0.575; pref/p = s(0.25).
    """
    args, w = tabpo_fixture()
    loss, m = value("tabpo", *args, **w)
    pref = softplus(-0.25)
    assert loss == pytest.approx(pref + 0.5, rel=1e-12)
    assert m["loss/pref"] == pytest.approx(pref)
    assert m["loss/barrier"] == pytest.approx(0.5)
    assert m["barrier/active_frac"] == pytest.approx(1 / 3)
    assert m["policy/prob_chosen"] == pytest.approx(math.exp(-0.575))
    assert m["pref/p"] == pytest.approx(1 / (1 + math.exp(-0.25)))
    assert m["delta/mean"] == pytest.approx(0.5)
    assert m["rewards/chosen"] == pytest.approx(0.5 * (-0.575 + 1.075))
    assert m["rewards/margins"] == pytest.approx(0.25)


def test_tabpo_barrier_gates_all_below_high_tau():
    """tau 0.95 (log = -0.0513) gates all three: B = (0.075 + 1.5 + 0.15) / 3 = 0.575."""
    args, w = tabpo_fixture()
    _, m = value("tabpo", *args, tau=0.95, barrier_weight=1.0, **w)
    assert m["loss/barrier"] == pytest.approx(0.575)


def test_tabpo_barrier_denominator_is_clipped_at_one():
    """l = [-0.01, -0.3], w~ = [1.5, 0.5], tau 0.9 (log = -0.105) gates only -0.3:
    B = 0.5 * 0.3 / max(0.5, 1) = 0.15, not the 0.3 a weighted mean would give."""
    b, gate = losses.barrier(
        np.array([[-0.01, -0.3]]), np.array([[1.5, 0.5]]), np.ones((1, 2)), tau=0.9, xp=np
    )
    np.testing.assert_allclose(b, [0.15])
    np.testing.assert_array_equal(gate, [[0.0, 1.0]])


def test_tabpo_no_token_below_tau_gives_zero_barrier():
    args, w = tabpo_fixture()
    loss, m = value("tabpo", *args, tau=0.01, **w)
    assert m["loss/barrier"] == 0.0
    assert m["barrier/active_frac"] == 0.0
    assert loss == pytest.approx(softplus(-0.25))


def test_tabpo_equal_weights_give_plain_mean():
    """Any constant weight normalises to 1: S+ = mean(l) = -1.3/3, S_ref+ = -2.3/3,
    Delta = (-1.3/3 + 0.5) - (-2.3/3 + 0.5) = 1/3 whatever the constant."""
    args, _ = tabpo_fixture()
    for c in (1.0, 3.7):
        _, m = value("tabpo", *args, chosen_weights=np.full((1, 3), c))
        assert m["delta/mean"] == pytest.approx(1 / 3)


def test_tabpo_v2_sums_and_ignores_weights():
    """v2: S+ = -1.3, S_ref+ = -2.3, S- = S_ref- = -1.5 -> Delta = 1.0;
    L_pref = -log s(0.5); barrier (count-normalised, tau 0.66) = 1.0 / 1 -> L = ... + 0.5."""
    args, w = tabpo_fixture()
    loss, m = value("tabpo", *args, variant="v2", **w)
    assert m["delta/mean"] == pytest.approx(1.0)
    assert loss == pytest.approx(softplus(-0.5) + 0.5)


def test_normalize_weights_mean_is_one_over_completion():
    """w = [5, 1, 2, 3], m = [0, 1, 1, 1]: w m = [0, 1, 2, 3], T = 3, sum 6 -> [0, .5, 1, 1.5]."""
    w = np.array([[5.0, 1.0, 2.0, 3.0]])
    m = np.array([[0.0, 1.0, 1.0, 1.0]])
    out = losses.normalize_weights(w, m, xp=np)
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0, 1.5]])


# --- contract ---------------------------------------------------------------------------


def test_padding_may_hold_minus_inf_and_extra_columns_change_nothing():
    args, w = tabpo_fixture()
    base = value("tabpo", *args, **w)[0]
    pad = lambda x, v: np.concatenate([x, np.full((1, 2), v)], axis=1)  # noqa: E731
    pc, pr, rc, rr, m, _ = args
    padded = [pad(pc, -np.inf), pad(pr, np.nan), pad(rc, -np.inf), pad(rr, 0.0)]
    pm = pad(m, 0.0)
    loss = value("tabpo", *padded, pm, pm, chosen_weights=pad(w["chosen_weights"], 7.0))[0]
    assert loss == pytest.approx(base, rel=1e-12)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError, match="unknown loss 'dpoo'; valid losses: tabpo, dpo"):
        losses.get("dpoo")


def test_unknown_hyperparameter_is_an_error():
    with pytest.raises(ValueError, match="loss 'dpo' has no hyperparameter 'tau'"):
        value("dpo", *pair_fixture(), tau=0.9)


@pytest.mark.parametrize(
    "name, hp",
    [
        ("tabpo", {"tau": 1.5}),
        ("tabpo", {"variant": "v3"}),
        ("dpo", {"beta": 0.0}),
        ("dpo", {"label_smoothing": 0.5}),
        ("tdpo", {"variant": "tdpo3"}),
    ],
)
def test_out_of_range_hyperparameters(name, hp):
    kl = {"chosen_kl": np.zeros((1, 3)), "rejected_kl": np.zeros((1, 3))} if name == "tdpo" else {}
    with pytest.raises(ValueError, match=next(iter(hp))):
        value(name, *pair_fixture(), **hp, **kl)


def test_reference_losses_refuse_missing_reference_and_tdpo_missing_kl():
    pc, pr, _, _, m, _ = pair_fixture()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        value("dpo", pc, pr, None, None, m, m)
    with pytest.raises(ValueError, match="needs chosen_kl and rejected_kl"):
        value("tdpo", *pair_fixture())


def test_every_loss_documents_its_formula_and_defaults_match_method():
    expected = {
        "tabpo": {"beta": 0.5, "tau": 0.66, "barrier_weight": 0.5, "variant": "v1"},
        "dpo": {"beta": 0.1, "label_smoothing": 0.0},
        "simpo": {"beta": 0.5, "gamma": 0.5},
        "dpop": {"beta": 0.1, "lam": 1.0},
        "tdpo": {"beta": 0.1, "alpha": None, "variant": "tdpo2"},
        "rpo": {"beta": 0.1, "alpha": 1.0},
        "orpo": {"lam": 0.1},
        "ipo": {"beta": 0.1, "normalize": True},
    }
    for name, defaults in expected.items():
        assert losses.get(name).defaults == defaults
    for name in losses.names():
        assert " L" in losses.get(name).formula or "L =" in losses.get(name).formula, name
    assert set(losses.names()) == {
        "tabpo",
        "dpo",
        "robust",
        "hinge",
        "ipo",
        "simpo",
        "cal_dpo",
        "dpop",
        "tdpo",
        "rpo",
        "orpo",
        "sft",
    }
