"""Every loss on NumPy, torch and MLX: values and gradients against a float64 NumPy oracle.

The oracle value is the loss on float64 NumPy; the oracle gradient is a central finite
difference of it (h = 1e-6), independent of any autograd. torch runs in float64 and
float32, MLX in float32 (its CPU build has no float64 arithmetic for everything).
"""

from __future__ import annotations

import numpy as np
import pytest

from tabpo import losses

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

B, T = 3, 7
HPARAMS = {
    "tabpo": [{}, {"variant": "v2"}, {"tau": 0.9, "barrier_weight": 1.0}],
    "dpo": [{}, {"label_smoothing": 0.2}],
    "robust": [{"label_smoothing": 0.1}],
    "hinge": [{"beta": 0.5}],
    "ipo": [{}, {"normalize": False}],
    "simpo": [{}],
    "cal_dpo": [{}],
    "dpop": [{"beta": 0.5}],
    "tdpo": [{}, {"variant": "tdpo1"}],
    "rpo": [{}],
    "orpo": [{}],
    "sft": [{}],
}
CASES = [(name, hp) for name, hps in HPARAMS.items() for hp in hps]
GRAD_ARGS = ("policy_chosen", "policy_rejected")


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 inputs: prompt columns and right padding masked, weights in [1, 1.44]."""
    rng = np.random.default_rng(seed)
    mask_c = np.zeros((B, T))
    mask_r = np.zeros((B, T))
    for b in range(B):
        start = 1 + b % 2
        mask_c[b, start : T - b] = 1
        mask_r[b, start : T - (b + 1) % 3] = 1
    # the policy sits away from the reference so margins, hinges and gates are not at a kink
    ref_c, ref_r = -2 * rng.random((B, T)) - 0.05, -2 * rng.random((B, T)) - 0.05
    return {
        "policy_chosen": ref_c + 0.3 * rng.standard_normal((B, T)) * (ref_c < -0.5),
        "policy_rejected": ref_r + 0.3 * rng.standard_normal((B, T)) * (ref_r < -0.5),
        "ref_chosen": ref_c,
        "ref_rejected": ref_r,
        "chosen_mask": mask_c,
        "rejected_mask": mask_r,
        "chosen_weights": rng.choice([1.0, 1.1, 1.2, 1.44], size=(B, T)),
        "rejected_weights": rng.choice([1.0, 1.2], size=(B, T)),
        "chosen_kl": rng.random((B, T)),
        "rejected_kl": rng.random((B, T)),
    }


def call(name, arrays, hp):
    arrays = dict(arrays)
    if name != "tdpo":
        arrays.pop("chosen_kl"), arrays.pop("rejected_kl")
    spec = losses.get(name)
    pos = [
        arrays.pop(k)
        for k in (
            "policy_chosen",
            "policy_rejected",
            "ref_chosen",
            "ref_rejected",
            "chosen_mask",
            "rejected_mask",
        )
    ]
    return spec(*pos, **arrays, **hp)


def oracle(name, hp, inputs):
    """Value, metrics and finite-difference gradients wrt the policy (and the KL inputs)."""
    loss, metrics = call(name, inputs, hp)
    wrt = GRAD_ARGS + (("chosen_kl", "rejected_kl") if name == "tdpo" else ())
    grads = {}
    for key in wrt:
        g = np.zeros_like(inputs[key])
        for idx in np.ndindex(*inputs[key].shape):
            up, down = dict(inputs), dict(inputs)
            up[key], down[key] = inputs[key].copy(), inputs[key].copy()
            up[key][idx] += 1e-6
            down[key][idx] -= 1e-6
            g[idx] = (float(call(name, up, hp)[0]) - float(call(name, down, hp)[0])) / 2e-6
        grads[key] = g
    return float(loss), {k: float(v) for k, v in metrics.items()}, grads


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


def check(label, got, want, rtol, atol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    diff = np.abs(got - want)
    assert np.allclose(got, want, rtol=rtol, atol=atol), (
        f"{label}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (rtol {rtol}, atol {atol})"
    )


@pytest.mark.parametrize("name, hp", CASES, ids=[f"{n}-{h}" for n, h in CASES])
@pytest.mark.parametrize(
    "lib, dtype", [("torch", "float64"), ("torch", "float32"), ("mlx", "float32")]
)
def test_values_and_gradients_match_oracle(name, hp, lib, dtype, inputs):
    want_loss, want_metrics, want_grads = oracle(name, hp, inputs)
    wrt = list(want_grads)
    tol = {"rtol": 1e-9, "atol": 1e-7} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}
    grad_tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == "float64" else {"rtol": 1e-4, "atol": 2e-5}
    if lib == "torch":
        arrays = {k: torch.tensor(v, dtype=getattr(torch, dtype)) for k, v in inputs.items()}
        for k in wrt:
            arrays[k].requires_grad_(True)
        loss, metrics = call(name, arrays, hp)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
        loss.backward()
        # a tensor never reached by the graph (TDPO2's KL+) has no grad: zero
        got_grads = {
            k: torch.zeros_like(arrays[k]) if arrays[k].grad is None else arrays[k].grad
            for k in wrt
        }
    else:
        arrays = {k: mx.array(v.astype(np.float32)) for k, v in inputs.items()}

        def f(*diff):
            return call(name, {**arrays, **dict(zip(wrt, diff, strict=True))}, hp)

        (loss, metrics), grads = mx.value_and_grad(f, argnums=tuple(range(len(wrt))))(
            *[arrays[k] for k in wrt]
        )
        assert isinstance(loss, mx.array) and loss.ndim == 0
        got_grads = dict(zip(wrt, grads, strict=True))
    check(f"{lib} {dtype} {name} loss", loss.tolist(), want_loss, **tol)
    assert set(metrics) == set(want_metrics)
    for key, want in want_metrics.items():
        check(f"{lib} {dtype} {name} {key}", metrics[key].tolist(), want, **tol)
    for key in wrt:
        got = np.array(got_grads[key].tolist())
        want = want_grads[key]
        if name == "tdpo" and key == "chosen_kl" and hp.get("variant", "tdpo2") == "tdpo2":
            want = np.zeros_like(want)  # TDPO2 stops the gradient through KL+
        check(f"{lib} {dtype} {name} d/d{key}", got, want, **grad_tol)
