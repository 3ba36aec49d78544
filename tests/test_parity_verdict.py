"""`tabpo parity`'s verdict: rounding never fails a row, a different function always does.

The rule (tabpo/training/parity.py): ``||t - m|| <= K (||t - T|| + ||m - M||)``, each stack
measured against itself in float64. These tests hold it to that on synthetic runs with
known rounding and known bugs, then on real backends with a bug injected in one of them.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build_tiny_model, write_pairs

from tabpo.backends import get_backend
from tabpo.data.batching import collate
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
from tabpo.data.records import read_preferences
from tabpo.training import parity
from tabpo.training.backend import LoraSettings, ModelOptions, TokenValues

QUANTITY = "policy log-probs (chosen)"


def runs_of(t, m, t64, m64, dtype="float32"):
    return {f"torch {dtype}": {QUANTITY: np.asarray(t, np.float64)},
            f"mlx {dtype}": {QUANTITY: np.asarray(m, np.float64)},
            "torch float64": {QUANTITY: np.asarray(t64, np.float64)},
            "mlx float64": {QUANTITY: np.asarray(m64, np.float64)}}  # fmt: skip


def row(t, m, t64, m64):
    return parity.Report("float32").add(QUANTITY, runs_of(t, m, t64, m64))


@pytest.mark.parametrize("size", [1e-7, 1e-3, 1.0])
def test_rounding_alone_never_fails_however_large(size):
    """Both stacks compute the same function (T == M) and round it, by up to ``size``, in
    any direction: every row passes, even where float32 rounding is huge (a fixed tolerance
    fails the 1e-3 and 1.0 cases)."""
    rng = np.random.default_rng(0)
    truth = rng.normal(-3.0, 1.0, 50)
    for trial in range(200):
        t = truth + size * rng.standard_normal(50)
        m = truth + size * rng.standard_normal(50) * rng.uniform(0, 3)
        check = row(t, m, truth, truth)
        assert check.ok and check.ratio <= 1.0 + 1e-9, (trial, check)


def test_a_different_function_fails_once_it_exceeds_the_rounding():
    """MLX computes another function (its float64 result is off by ``bias``): the row fails
    when the bias is 3x the two stacks' rounding, and passes when it is far below it."""
    rng = np.random.default_rng(1)
    truth = rng.normal(-3.0, 1.0, 50)
    noise = 1e-6
    t = truth + noise * rng.standard_normal(50)
    m_err = noise * rng.standard_normal(50)
    e = np.linalg.norm(t - truth) + np.linalg.norm(m_err)
    for factor, ok in ((0.05, True), (3.0, False), (100.0, False)):
        bias = factor * e * np.ones(50) / np.sqrt(50)  # ||bias|| = factor * (e_t + e_m)
        check = row(t, truth + bias + m_err, truth, truth + bias)
        assert check.ok is ok, (factor, check)
    assert not row(t, truth + 1e-3, truth, truth + 1e-3).ok  # the old bias bug's size


def test_exact_quantities_pass_when_equal_and_fail_when_not():
    """A count or an accuracy: no rounding on either side, so any difference is a bug (the
    float64 floor does not excuse it), and equal values pass."""
    assert row(0.25, 0.25, 0.25, 0.25).ok
    assert not row(0.25, 0.5, 0.25, 0.5).ok


def test_a_rounding_flip_of_an_accuracy_is_excused_by_the_side_that_flipped():
    """A margin near 0 rounds to the other sign on one stack: its accuracy moves by 1/B in
    float32 but not in float64, which is that stack's rounding error."""
    assert row(0.25, 0.5, 0.25, 0.25).ok


def test_the_verdict_names_the_worst_row_and_the_rule():
    report = parity.Report("float32")
    report.add(QUANTITY, runs_of([1.0, 2.0], [1.0, 2.5], [1.0, 2.0], [1.0, 2.5]))
    assert not report.ok
    assert report.verdict().startswith(
        f"FAIL: 1 of 1 rows beyond {parity.K:g}x the stacks' own float32 rounding; worst "
        f"'{QUANTITY}'"
    )


# -- real backends, with a bug injected -------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdict")
    model = build_tiny_model(root / "m", "llama")
    tokenizer = load_tokenizer(model)
    pairs, _ = encode_pairs(tokenizer, read_preferences(write_pairs(root / "d.jsonl", 3))[0])
    return model, collate(pairs, pad_id(tokenizer))


def loader(model, state=None):
    """Both backends with the same non-zero LoRA factors (std 0.05)."""
    shared = {}

    def load(name, dtype):
        backend = get_backend(name)
        backend.load(ModelOptions(path=str(model), dtype=dtype,
                                  lora=LoraSettings(rank=4, alpha=8.0, dropout=0.0)))  # fmt: skip
        if not shared:
            rng = np.random.default_rng(0)
            shared.update({k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
                           for k, v in backend.trainable_state().items()})  # fmt: skip
        backend.load_trainable_state(shared)
        return backend

    return load


def failing(report):
    return sorted(c.quantity for c in report.checks if not c.ok)


def test_real_backends_pass_and_every_quantity_has_its_rows(setup):
    model, batch = setup
    report = parity.compare_backends(loader(model), batch, ["tabpo", "tdpo", "cal_dpo"],
                                     "float32")  # fmt: skip
    assert report.ok, [c for c in report.checks if not c.ok]
    names = {c.quantity for c in report.checks}
    for expected in ("policy log-probs (chosen)", "reference log-probs (rejected)",
                     "KL (chosen)", "sum c l: value", "sum c l: gradient (28 tensors)",
                     "sum c l + k KL: gradient (28 tensors)", "tabpo: loss",
                     "tabpo: loss/barrier", "tabpo: dL/dlog-probs", "tdpo: dL/dKL"):  # fmt: skip
        assert expected in names, sorted(names)
    assert set(report.seconds) == {"torch float32", "mlx float32", "torch float64",
                                   "mlx float64"}  # fmt: skip
    # each stack's float32 is measurably off its float64 (the runs really differ in dtype)
    logps = next(c for c in report.checks if c.quantity == "policy log-probs (chosen)")
    assert 0 < logps.torch_error < 1e-3 and 0 < logps.mlx_error < 1e-3, logps


def test_a_peaky_model_whose_rounding_beats_a_fixed_tolerance_passes(tmp_path):
    """A tiny llama with every weight but the norms x10: the stacks' float32 gradients are
    5e-5 apart relative (the old fixed tolerance was 3e-5), and each stack alone is about
    as far from its float64, so the rows pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tmp_path / "m", "llama")
    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    lm.save_pretrained(model)
    tokenizer = load_tokenizer(model)
    pairs, _ = encode_pairs(tokenizer, read_preferences(write_pairs(tmp_path / "d.jsonl", 4))[0])
    report = parity.compare_backends(loader(model), collate(pairs, pad_id(tokenizer)),
                                     ["cal_dpo"], "float32")  # fmt: skip
    assert report.ok, [c for c in report.checks if not c.ok]
    backward = next(c for c in report.checks if c.quantity.startswith("sum c l: gradient"))
    assert backward.diff / abs(backward.torch) > 3e-5, backward
    assert backward.torch_error / abs(backward.torch) > 1.5e-5, backward


def test_a_wrong_lora_scale_on_one_stack_fails_exactly_the_rows_it_touches(setup, monkeypatch):
    """MLX's adapter scaled by 1.001: the policy's log-probs and the backward (its value and
    gradient) fail; the reference (adapter off) and the loss math (shared inputs) pass."""
    from tabpo.backends import _mlx_model

    real = _mlx_model.lora_parameters

    def off(model, lora):
        params = real(model, lora)
        return {**params, "scale": params["scale"] * 1.001}

    monkeypatch.setattr(_mlx_model, "lora_parameters", off)
    model, batch = setup
    report = parity.compare_backends(loader(model), batch, ["dpo"], "float32")
    assert failing(report) == [
        "policy log-probs (chosen)", "policy log-probs (rejected)",
        "sum c l: gradient (28 tensors)", "sum c l: value",
    ], failing(report)  # fmt: skip


def test_a_wrong_loss_gradient_on_one_stack_fails_its_row(setup, monkeypatch):
    """The loss math on MLX returns a gradient off by 1e-4 relative: that row fails."""
    from tabpo.backends.mlx import MlxBackend

    real = MlxBackend.objective_gradient

    def off(self, objective, batch, values, dtype):
        got = real(self, objective, batch, values, dtype)
        return type(got)(got.loss, got.metrics, tuple(g * (1 + 1e-4) for g in got.policy),
                         got.kl)  # fmt: skip

    monkeypatch.setattr(MlxBackend, "objective_gradient", off)
    model, batch = setup
    report = parity.compare_backends(loader(model), batch, ["ipo"], "float32")
    assert failing(report) == ["ipo: dL/dlog-probs"], report.checks


def test_the_cotangent_objective_is_the_linear_function_it_claims(setup):
    """``sum_t c_t l_t`` per pair: its gradient w.r.t. the log-probs is c / B (the mean over
    pairs), on both array libraries."""
    model, batch = setup
    rng = np.random.default_rng(3)
    shape = batch.chosen_ids.shape
    c = TokenValues((rng.standard_normal(shape), rng.standard_normal(shape)))
    lp = TokenValues((rng.normal(-2, 1, shape), rng.normal(-2, 1, shape)))
    objective = parity.cotangent_objective(c)
    for name in ("torch", "mlx"):
        got = get_backend(name).objective_gradient(objective, batch, lp, "float64")
        masks = (batch.chosen_mask, batch.rejected_mask)
        want = [ci * mi / batch.size for ci, mi in zip(c.policy, masks, strict=True)]
        for g, w in zip(got.policy, want, strict=True):
            assert np.abs(g - w).max() < 1e-12, (name, np.abs(g - w).max())
        terms = zip(c.policy, lp.policy, masks, strict=True)
        expected = sum((ci * li * mi).sum() for ci, li, mi in terms) / batch.size
        assert abs(got.loss - expected) < 1e-9 * abs(expected), (name, got.loss, expected)
