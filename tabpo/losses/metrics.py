"""Batch metrics under TRL's names, shared by every loss (0-d arrays, means over pairs)."""

from __future__ import annotations

from tabpo.losses.inputs import PairInputs
from tabpo.losses.xp import Array


def reward_metrics(
    inputs: PairInputs, rewards_chosen: Array, rewards_rejected: Array
) -> dict[str, Array]:
    """``rewards/*`` from per-pair implicit rewards (B,), plus ``logps/*`` (sequence sums).

    ``rewards/accuracies`` compares the rewards pair by pair, then averages (TRL's meaning),
    not the batch means.
    """
    xp = inputs.xp
    won = xp.astype(rewards_chosen > rewards_rejected, rewards_chosen.dtype)
    return {
        "rewards/chosen": xp.mean(rewards_chosen),
        "rewards/rejected": xp.mean(rewards_rejected),
        "rewards/margins": xp.mean(rewards_chosen - rewards_rejected),
        "rewards/accuracies": xp.mean(won),
        **logps_metrics(inputs),
    }


def logps_metrics(inputs: PairInputs) -> dict[str, Array]:
    xp = inputs.xp
    out = {"logps/chosen": xp.mean(inputs.logps_chosen)}
    if inputs.policy_rejected is not None:
        out["logps/rejected"] = xp.mean(inputs.logps_rejected)
    return out
