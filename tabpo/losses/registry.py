"""Name -> loss registry: the one place the CLI and the trainer look losses up.

A loss is a pure function ``fn(inputs: PairInputs, *, <hyperparameters>) -> (per_pair,
metrics)`` with ``per_pair`` of shape (B,). The registry wraps it in the public calling
convention (positional arrays, keyword hyperparameters, mean over pairs) and rejects
hyperparameters the loss does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tabpo.common.errors import TabpoError
from tabpo.losses.inputs import PairInputs
from tabpo.losses.xp import Array, namespace

Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]


class LossError(TabpoError, ValueError):
    """An unknown loss, an unknown hyperparameter or a value out of range."""


class UnknownLossError(LossError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: call it like the function the public contract describes."""

    name: str
    fn: LossFn
    reference_free: bool = False
    needs_kl: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_pairs: bool = True  # False: trains on prompt/completion data (rejected unused)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n", 1)[0]

    @property
    def formula(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def check_hparams(self, hparams: dict[str, Any]) -> None:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise LossError(
                f"loss '{self.name}' has no hyperparameter {', '.join(map(repr, unknown))} "
                f"(it takes: {valid})"
            )

    def per_pair(
        self,
        policy_chosen: Array,
        policy_rejected: Array | None,
        ref_chosen: Array | None,
        ref_rejected: Array | None,
        chosen_mask: Array,
        rejected_mask: Array | None,
        chosen_weights: Array | None = None,
        rejected_weights: Array | None = None,
        *,
        chosen_kl: Array | None = None,
        rejected_kl: Array | None = None,
        **hparams: Any,
    ) -> tuple[Array, Metrics]:
        """The loss of every pair, shape (B,), and the batch metrics (0-d arrays)."""
        self.check_hparams(hparams)
        if not self.reference_free and (ref_chosen is None or ref_rejected is None):
            raise LossError(f"loss '{self.name}' needs reference log-probs (got None)")
        if self.needs_kl and (chosen_kl is None or rejected_kl is None):
            raise LossError(f"loss '{self.name}' needs chosen_kl and rejected_kl")
        inputs = PairInputs.build(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            chosen_mask,
            rejected_mask,
            chosen_weights,
            rejected_weights,
            chosen_kl,
            rejected_kl,
        )
        return self.fn(inputs, **hparams)

    def bind(self, **hparams: Any) -> Objective:
        """This loss with its hyperparameters fixed (checked now, not at the first step)."""
        self.check_hparams(hparams)
        return Objective(self, dict(hparams))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Array, Metrics]:
        """``(loss, metrics)``: ``loss`` is the mean over pairs, a 0-d array."""
        per_pair, metrics = self.per_pair(*args, **kwargs)
        return namespace(per_pair).mean(per_pair), metrics


@dataclass(frozen=True)
class Objective:
    """A loss with bound hyperparameters, as a backend calls it: ``(per_pair, metrics)``."""

    spec: LossSpec
    hparams: dict[str, Any]

    @property
    def needs_reference(self) -> bool:
        return not self.spec.reference_free

    @property
    def needs_kl(self) -> bool:
        return self.spec.needs_kl

    def __call__(
        self,
        policy_chosen: Array,
        policy_rejected: Array | None,
        ref_chosen: Array | None,
        ref_rejected: Array | None,
        chosen_mask: Array,
        rejected_mask: Array | None,
        chosen_weights: Array | None = None,
        rejected_weights: Array | None = None,
        chosen_kl: Array | None = None,
        rejected_kl: Array | None = None,
    ) -> tuple[Array, Metrics]:
        return self.spec.per_pair(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            chosen_mask,
            rejected_mask,
            chosen_weights,
            rejected_weights,
            chosen_kl=chosen_kl,
            rejected_kl=rejected_kl,
            **self.hparams,
        )


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str, *, reference_free: bool = False, needs_kl: bool = False, needs_pairs: bool = True
) -> Callable[[LossFn], LossFn]:
    """Decorator: add ``fn`` to the registry under ``name``; defaults come from its signature."""

    def wrap(fn: LossFn) -> LossFn:
        params = list(inspect.signature(fn).parameters.values())[1:]
        defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        _REGISTRY[name] = LossSpec(name, fn, reference_free, needs_kl, defaults, needs_pairs)
        return fn

    return wrap


def get(name: str) -> LossSpec:
    """The loss registered as ``name``; a clear error listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss '{name}'; valid losses: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    return list(_REGISTRY)


def check_range(name: str, value: float, low: float, high: float, *, closed: str = "") -> None:
    """Raise a LossError unless ``low < value < high`` (ends in ``closed`` are allowed)."""
    ok_low = value >= low if "low" in closed else value > low
    ok_high = value <= high if "high" in closed else value < high
    if not (ok_low and ok_high):
        lo = "[" if "low" in closed else "("
        hi = "]" if "high" in closed else ")"
        raise LossError(f"{name}={value} is out of range {lo}{low}, {high}{hi}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise LossError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
