"""The math: the array protocol (``xp``), TAB-PO's token weights, every objective of
docs/method.md §1-3 and its metrics. May import: tabpo.common.

    from tabpo import losses
    fn = losses.get("tabpo")
    loss, metrics = fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                       chosen_mask, rejected_mask,
                       chosen_weights=None, rejected_weights=None, **hparams)

Inputs are per-token log-probs (B, T) of NumPy, torch or MLX; ``loss`` is the mean over
pairs (0-d, differentiable through the policy inputs), ``metrics`` a dict of 0-d arrays.
"""

from tabpo.losses import tabpo, dpo, reference_free  # noqa: F401, I001  (registers, in table order)
from tabpo.losses.inputs import PairInputs
from tabpo.losses.registry import (
    LossError,
    LossSpec,
    Objective,
    UnknownLossError,
    get,
    names,
)
from tabpo.losses.tabpo import barrier, normalize_weights

__all__ = [
    "LossError",
    "LossSpec",
    "Objective",
    "PairInputs",
    "UnknownLossError",
    "barrier",
    "get",
    "names",
    "normalize_weights",
]
