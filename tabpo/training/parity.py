"""Do both backends compute the same function? What ``tabpo parity`` runs, decided by float64.

On one batch, three kinds of quantity (docs/design.md, "Parity"):

1. The forward: per-token log-probs of the policy and of the reference, and the per-token
   KL to the reference when a loss with a KL term is compared (all three then come from the
   forward such a loss runs, and the plain forward is checked by the value of 3).
2. Every loss on the same per-token inputs (the first run's forward): its value, its
   metrics and its gradient with respect to the per-token log-probs (and the KL). This is
   core math run on each backend's array library, without the model.
3. The model's backward: the value and the gradient of the trained weights of
   ``sum_t c_t l_t`` for one random cotangent ``c`` over the per-token log-probs ``l``, that
   is ``J^T c``; when a KL is compared, also of ``sum_t c_t l_t + k_t KL_t`` through the KL
   forward.

A training step's gradient is ``J^T dL/dl``. When 2 and 3 agree on both stacks, so does that
gradient, for every loss: the backward is linear in its cotangent, and a random cotangent
catches a difference between two linear maps with probability one. One backward per
backend therefore stands for a backward per loss.

The verdict. Each quantity is computed four times, by the same code: by each backend in
the compared dtype (t, m) and again in float64 (T, M; torch and MLX both have float64 on
the CPU). ``e_t = ||t - T||`` and ``e_m = ||m - M||`` are each stack's own rounding error of
that quantity. A row passes when

    ||t - m|| <= K (e_t + e_m) + FLOOR * max(||T||, ||M||),    K = 2.

Since ``||t - m|| <= e_t + e_m + ||T - M||``, rounding alone cannot fail a row, however
large it gets (a peaky model, cal_dpo's cancelling gradients, bf16). A row fails only when
the float64 results differ, that is, when the stacks compute different functions: by more
than ``(K + 1) (e_t + e_m)`` it always fails. K is 2 and not 1 because a float64 run is not
float64 throughout: transformers computes RoPE's angles in float32 whatever the model's
dtype, so ``||T - M||`` carries some float32 rounding of its own.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tabpo import losses
from tabpo.data.batching import PairBatch
from tabpo.losses import Objective
from tabpo.losses.inputs import PairInputs
from tabpo.losses.registry import LossSpec
from tabpo.losses.xp import like
from tabpo.training.backend import FLOAT64, Backend, TokenValues
from tabpo.training.run import Callbacks

K = 2.0
FLOOR = 1e-12  # float64's own agreement, for quantities float32 computes exactly
STACKS = ("torch", "mlx")

# (backend name, dtype) -> that backend loaded in that dtype, on the weights being compared
Loader = Callable[[str, str], Backend]


@dataclass
class Check:
    quantity: str
    torch: float  # the value; of an array, its sum for log-probs (signed), else its 2-norm
    mlx: float
    diff: float  # ||t - m||
    torch_error: float  # ||t - T||: torch's rounding of this quantity
    mlx_error: float  # ||m - M||
    float64_diff: float  # ||T - M||
    ratio: float  # diff / (torch_error + mlx_error + floor); the row passes at <= K
    ok: bool


@dataclass
class Report:
    dtype: str
    checks: list[Check] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per run ("torch float32"...)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def verdict(self) -> str:
        """One line: pass or fail, how many rows, and the worst row's ratio."""
        worst = max(self.checks, key=lambda c: c.ratio)
        failed = sum(not c.ok for c in self.checks)
        head = (f"FAIL: {failed} of {len(self.checks)} rows beyond" if failed
                else f"PASS: all {len(self.checks)} rows within")  # fmt: skip
        return (f"{head} {K:g}x the stacks' own {self.dtype} rounding; worst "
                f"{worst.quantity!r}: {worst.ratio:.2f}x")  # fmt: skip

    def add(self, quantity: str, runs: dict[str, dict[str, np.ndarray]]) -> Check:
        """One row from the four runs' values of ``quantity``."""
        t, m = runs[f"torch {self.dtype}"][quantity], runs[f"mlx {self.dtype}"][quantity]
        t64, m64 = runs[f"torch {FLOAT64}"][quantity], runs[f"mlx {FLOAT64}"][quantity]
        norm = lambda x: float(np.linalg.norm(np.ravel(x)))  # noqa: E731
        diff, e_t, e_m = norm(t - m), norm(t - t64), norm(m - m64)
        floor = FLOOR * max(norm(t64), norm(m64), 1e-300)
        ratio = diff / (e_t + e_m + floor)
        shown = [float(x.sum()) if "log-probs (" in quantity else
                 (float(x) if x.ndim == 0 else norm(x)) for x in (t, m)]  # fmt: skip
        check = Check(quantity, shown[0], shown[1], diff, e_t, e_m, norm(t64 - m64), ratio,
                      bool(np.isfinite(ratio) and ratio <= K))  # fmt: skip
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "pass": self.ok, "k": K, "seconds": self.seconds,
                "checks": [asdict(c) for c in self.checks]}  # fmt: skip


def cotangent_objective(cotangent: TokenValues) -> Objective:
    """The linear objective ``sum_t c_t l_t (+ sum_t k_t KL_t)`` per pair, whose gradient
    through the model is ``J^T c``: ``cotangent.policy`` weighs the log-probs, its ``kl``
    (when given) the per-token KL."""

    def fn(inputs: PairInputs) -> tuple[Any, dict[str, Any]]:
        xp, lp = inputs.xp, inputs.policy_chosen
        terms = [(cotangent.policy[0], lp), (cotangent.policy[1], inputs.policy_rejected)]
        if cotangent.kl is not None:
            terms += [(cotangent.kl[0], inputs.chosen_kl), (cotangent.kl[1], inputs.rejected_kl)]
        per_pair = sum(xp.sum(like(c, lp) * x, axis=-1) for c, x in terms)
        return per_pair, {}

    with_kl = cotangent.kl is not None
    spec = LossSpec("cotangent", fn, reference_free=not with_kl, needs_kl=with_kl)
    return Objective(spec, {})


def random_cotangents(batch: PairBatch, seed: int) -> tuple[TokenValues, TokenValues]:
    """Standard normal cotangents over the log-probs, and over log-probs and KL."""
    rng = np.random.default_rng([seed, 0xC07])
    shape = batch.chosen_ids.shape
    draw = lambda: (rng.standard_normal(shape), rng.standard_normal(shape))  # noqa: E731
    return TokenValues(draw()), TokenValues(draw(), kl=draw())


def measure(
    backend: Backend, dtype: str, batch: PairBatch, objectives: dict[str, Objective],
    inputs: TokenValues | None, seed: int,
) -> tuple[dict[str, np.ndarray], TokenValues]:  # fmt: skip
    """Every quantity of one run (``backend`` loaded in ``dtype``) as float64 NumPy, and its
    forward as ``TokenValues``. The loss math runs at ``inputs`` (None: at this forward), in
    float32 (log-probs are float32 whatever the model's dtype) or float64."""
    out: dict[str, np.ndarray] = {}
    with_kl = any(o.needs_kl for o in objectives.values())
    if with_kl:  # the KL forward gives all three (the plain one: the first backward's value)
        forward = backend.logps_and_kl(batch)
    else:
        forward = TokenValues(backend.logps(batch), backend.logps(batch, reference=True))
    for what, pair in (("policy log-probs", forward.policy), ("KL", forward.kl),
                       ("reference log-probs", forward.reference)):  # fmt: skip
        for side, values in zip(("chosen", "rejected"), pair, strict=True) if pair else ():
            out[f"{what} ({side})"] = values
    plain, kl = random_cotangents(batch, seed)
    for cotangent in (plain, kl) if with_kl else (plain,):
        backend.zero_grad()
        step = backend.forward_backward(batch, cotangent_objective(cotangent), None, 1.0)
        grads = backend.gradients()
        backend.zero_grad()
        what = "sum c l + k KL" if cotangent.kl is not None else "sum c l"
        out[f"{what}: value"] = np.asarray(step.loss)
        out[f"{what}: gradient ({len(grads)} tensors)"] = np.concatenate(
            [np.ravel(grads[k]) for k in sorted(grads)]
        )
    inputs = inputs or forward
    for name, objective in objectives.items():
        needed = TokenValues(inputs.policy, inputs.reference if objective.needs_reference
                             else None, inputs.kl if objective.needs_kl else None)  # fmt: skip
        got = backend.objective_gradient(objective, batch, needed,
                                         FLOAT64 if dtype == FLOAT64 else "float32")  # fmt: skip
        out[f"{name}: loss"] = np.asarray(got.loss)
        for metric, value in sorted(got.metrics.items()):
            out[f"{name}: {metric}"] = np.asarray(value)
        out[f"{name}: dL/dlog-probs"] = np.concatenate([np.ravel(g) for g in got.policy])
        if got.kl is not None:
            out[f"{name}: dL/dKL"] = np.concatenate([np.ravel(g) for g in got.kl])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}, forward


def compare_backends(
    load: Loader, batch: PairBatch, loss_names: list[str], dtype: str, *, seed: int = 0,
    callbacks: Callbacks | None = None,
) -> Report:  # fmt: skip
    """Run each backend in ``dtype`` and in float64 on ``batch`` (``load`` gives each, one
    at a time) and compare everything (a "parity" phase of four runs)."""
    callbacks = callbacks or Callbacks()
    objectives = {name: losses.get(name).bind() for name in loss_names}
    report, runs = Report(dtype), {}
    callbacks.phase("parity", 2 * len(STACKS))
    inputs: TokenValues | None = None
    for dt in (dtype, FLOAT64):
        for stack in STACKS:
            start = time.perf_counter()
            backend = load(stack, dt)
            runs[f"{stack} {dt}"], forward = measure(backend, dt, batch, objectives, inputs,
                                                 seed)  # fmt: skip
            inputs = inputs or forward  # the losses are all compared at the first forward
            del backend
            gc.collect()
            report.seconds[f"{stack} {dt}"] = round(time.perf_counter() - start, 2)
            callbacks.advance("parity")
    for quantity in runs[f"torch {dtype}"]:
        report.add(quantity, runs)
    return report
