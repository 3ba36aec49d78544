"""What every loss sees: one batch of pairs as per-token log-probs, shapes (B, T).

Column t of every array refers to completion token t of its sequence; the masks are 1 on
completion tokens (including the end-of-turn token) and 0 on prompt and padding. Values at
masked positions are ignored (replaced by 0 before any arithmetic, so padding may hold
anything finite or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any

from tabpo.losses.xp import Array, like, namespace


@dataclass(frozen=True)
class PairInputs:
    """Policy and reference log-probs of chosen (c) and rejected (r) completions."""

    xp: ModuleType
    policy_chosen: Array  # (B, T)
    policy_rejected: Array | None  # (B, T); None only for losses that ignore rejected
    ref_chosen: Array | None
    ref_rejected: Array | None
    chosen_mask: Array
    rejected_mask: Array | None
    chosen_weights: Array  # raw token weights (1 where none were given)
    rejected_weights: Array | None
    chosen_kl: Array | None = None  # (B, T) KL(pi_ref || pi_theta) per position, for TDPO
    rejected_kl: Array | None = None

    @classmethod
    def build(
        cls,
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
    ) -> PairInputs:
        """Bring everything into the policy's namespace and dtype; zero out masked slots."""
        xp = namespace(policy_chosen)
        ref = policy_chosen

        def conv(x: Any) -> Array | None:
            return None if x is None else like(x, ref)

        cm, rm = conv(chosen_mask), conv(rejected_mask)
        assert cm is not None

        def masked(x: Any, m: Array | None) -> Array | None:
            # where(), not x * m: padding may hold -inf, and 0 * -inf is nan
            x = conv(x)
            return None if x is None or m is None else xp.where(m > 0, x, xp.zeros_like(x))

        cw = conv(chosen_weights)
        rw = conv(rejected_weights)
        return cls(
            xp=xp,
            policy_chosen=masked(policy_chosen, cm),
            policy_rejected=masked(policy_rejected, rm),
            ref_chosen=masked(ref_chosen, cm),
            ref_rejected=masked(ref_rejected, rm),
            chosen_mask=cm,
            rejected_mask=rm,
            chosen_weights=xp.ones_like(cm) if cw is None else cw,
            rejected_weights=(xp.ones_like(rm) if rw is None else rw) if rm is not None else None,
            chosen_kl=masked(chosen_kl, cm),
            rejected_kl=masked(rejected_kl, rm),
        )

    def _sum(self, x: Array) -> Array:
        return self.xp.sum(x, axis=-1)

    @cached_property
    def chosen_len(self) -> Array:
        """``|y+| = max(sum_t m_t, 1)``, shape (B,)."""
        return self.xp.maximum(self._sum(self.chosen_mask), 1.0)

    @cached_property
    def rejected_len(self) -> Array:
        return self.xp.maximum(self._sum(self.rejected_mask), 1.0)

    @cached_property
    def logps_chosen(self) -> Array:
        """Sequence log-prob ``sum_t m_t l_t`` of the chosen completion, shape (B,)."""
        return self._sum(self.policy_chosen)

    @cached_property
    def logps_rejected(self) -> Array:
        return self._sum(self.policy_rejected)

    @cached_property
    def ref_logps_chosen(self) -> Array:
        return self._sum(self.ref_chosen)

    @cached_property
    def ref_logps_rejected(self) -> Array:
        return self._sum(self.ref_rejected)

    @cached_property
    def mean_logps_chosen(self) -> Array:
        """Token-mean log-prob of the chosen completion, ``sum_t m_t l_t / |y+|``."""
        return self.logps_chosen / self.chosen_len

    @cached_property
    def mean_logps_rejected(self) -> Array:
        return self.logps_rejected / self.rejected_len

    @cached_property
    def h_chosen(self) -> Array:
        """``h+ = sum_t m_t (l_t - r_t)``: the chosen log-ratio to the reference, (B,)."""
        return self.logps_chosen - self.ref_logps_chosen

    @cached_property
    def h_rejected(self) -> Array:
        return self.logps_rejected - self.ref_logps_rejected
