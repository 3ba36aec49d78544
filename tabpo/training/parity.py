"""Both backends on the same weights and batch: log-probs, losses, metrics and gradients.

What ``tabpo parity`` runs. Every comparison is a row (quantity, torch, mlx, max abs diff,
relative diff, tolerance, pass). Relative differences are 2-norm ratios (a scalar's abs
value): ``||a - b|| / max(||a||, ||b||, floor)``, the floor being the size of what the
quantity is computed from (a margin of 0.05 is a difference of sequence log-probs ~100).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tabpo import losses
from tabpo.data.batching import PairBatch
from tabpo.training.backend import Backend
from tabpo.training.run import Callbacks

# float32: log-probs, losses and metrics to 1e-5; gradients to 3e-5 (MLX's own float32
# gradients are up to 1.6e-5 from float64 on small random models, torch's 4e-6).
TOLERANCES = {
    "float32": {"logps": 1e-5, "loss": 1e-5, "grad": 3e-5},
    "bfloat16": {"logps": 2e-2, "loss": 5e-2, "grad": 2e-1},
    "float16": {"logps": 5e-3, "loss": 1e-2, "grad": 5e-2},
}


@dataclass
class Check:
    quantity: str
    torch: float  # the value; of an array, its sum for log-probs (signed), else its 2-norm
    mlx: float
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    ok: bool


@dataclass
class Report:
    dtype: str
    checks: list[Check] = field(default_factory=list)
    values: dict[str, dict[str, Any]] = field(default_factory=lambda: {"torch": {}, "mlx": {}})

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def verdict(self) -> str:
        """One line: pass or fail, how many checks, and the worst row against its tolerance."""
        worst = max(self.checks, key=lambda c: c.rel_diff / c.tolerance)
        failed = sum(not c.ok for c in self.checks)
        head = (f"FAIL: {failed} of {len(self.checks)} checks over tolerance" if failed
                else f"PASS: all {len(self.checks)} checks within tolerance")  # fmt: skip
        share = worst.rel_diff / worst.tolerance
        return (f"{head}; worst {worst.quantity!r}: {worst.rel_diff:.2e} relative, "
                f"{share:.0%} of its tolerance")  # fmt: skip

    def compare(self, quantity: str, a: Any, b: Any, kind: str, floor: float = 0.0) -> Check:
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        diff = np.abs(a64 - b64)
        norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        rel = float(np.linalg.norm(diff)) / max(norm_a, norm_b, floor, 1e-30)
        tol = TOLERANCES[self.dtype][kind]
        ok = bool(np.isfinite(rel) and rel <= tol)
        # what a reader recognises: a sequence's total log-prob keeps its sign
        shown = [
            float(x.sum()) if kind == "logps" else n for x, n in ((a64, norm_a), (b64, norm_b))
        ]
        check = Check(quantity, shown[0] if a64.ndim else float(a64), shown[1] if b64.ndim
                      else float(b64), float(diff.max(initial=0.0)), rel, tol, ok)  # fmt: skip
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "pass": self.ok, "backends": self.values,
                "checks": [asdict(c) for c in self.checks]}  # fmt: skip


def compare_backends(
    torch_backend: Backend, mlx_backend: Backend, batch: PairBatch, loss_names: list[str],
    dtype: str, callbacks: Callbacks | None = None,
) -> Report:  # fmt: skip
    """Both backends are loaded on the same weights; compare everything on ``batch``
    (``callbacks``: a "parity" phase, one step for the log-probs and one per loss)."""
    callbacks = callbacks or Callbacks()
    callbacks.phase("parity", 1 + len(loss_names))
    report = Report(dtype)
    pair = {"torch": torch_backend, "mlx": mlx_backend}
    for reference in (False, True):
        got = {k: b.logps(batch, reference=reference) for k, b in pair.items()}
        for side, i in (("chosen", 0), ("rejected", 1)):
            name = f"{'reference' if reference else 'policy'} log-probs ({side})"
            report.compare(name, got["torch"][i], got["mlx"][i], "logps")
    callbacks.advance("parity")
    for name in loss_names:
        objective = losses.get(name).bind()
        results = {}
        for key, backend in pair.items():
            results[key] = backend.forward_backward(batch, objective, None, 1.0)
            report.values[key][name] = {"loss": results[key].loss,
                                        "metrics": results[key].metrics}  # fmt: skip
        t, m = results["torch"], results["mlx"]
        size = max(abs(t.metrics.get("logps/chosen", 1.0)), abs(t.metrics.get("logps/rejected",
                   1.0)), 1.0)  # fmt: skip
        report.compare(f"{name}: loss", t.loss, m.loss, "loss", floor=1.0)
        for metric in sorted(set(t.metrics) & set(m.metrics)):
            report.compare(f"{name}: {metric}", t.metrics[metric], m.metrics[metric], "loss",
                           floor=size)  # fmt: skip
        gt, gm = torch_backend.gradients(), mlx_backend.gradients()
        flat = [np.concatenate([np.ravel(g[k]) for k in sorted(g)]) for g in (gt, gm)]
        report.compare(f"{name}: gradients ({len(gt)} tensors)", flat[0], flat[1], "grad")
        for backend in pair.values():
            backend.zero_grad()
        callbacks.advance("parity")
    return report
