"""What the reference is, and when a step runs it: decided here once for every backend.

- LoRA: the policy with its adapter switched off (no second model).
- Full fine-tuning: a separate model (``ref_path``), else a frozen copy of the initial model
  (``keep_reference``), else none (``source``). With none, the reference is the initial policy:
  the loop precomputes its log-probs before the first step by asking for the *policy's*
  log-probs (``tabpo.training.loop.reference_table``), and a backend asked for the reference
  afterwards raises ``missing_reference()``; it never lets the moving policy stand in.
- A step uses precomputed log-probs when it is given them, except for an objective with a
  KL term, which needs the reference's full distributions and runs it again
  (``reference_use``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch
from tabpo.losses import Objective
from tabpo.training.backend import ModelOptions

NONE, GIVEN, RUN, KL = "none", "given", "run", "kl"  # reference_use
ADAPTER_OFF, SEPARATE, INITIAL_COPY, ABSENT = "adapter off", "separate", "initial copy", "absent"


def source(options: ModelOptions) -> str:
    """Where a backend gets the reference model from: ``ADAPTER_OFF`` (LoRA: the policy
    without its adapter), ``SEPARATE`` (load ``options.ref_path``), ``INITIAL_COPY`` (freeze
    a copy of the weights as loaded) or ``ABSENT`` (precomputed log-probs only)."""
    if options.finetune == "lora":
        return ADAPTER_OFF
    if options.ref_path:
        return SEPARATE
    return INITIAL_COPY if options.keep_reference else ABSENT


def reference_use(objective: Objective, given: Any) -> str:
    """How a step gets the reference, given precomputed log-probs ``given`` (or None):

    ``NONE``  the objective uses no reference;
    ``KL``    run the reference now and keep its distributions: a KL term needs them, and
              precomputed log-probs cannot give them, so ``given`` is ignored;
    ``GIVEN`` use ``given`` (checked with ``check_given``);
    ``RUN``   run the reference now.
    """
    if objective.needs_kl:
        return KL
    if not objective.needs_reference:
        return NONE
    return RUN if given is None else GIVEN


def check_given(batch: PairBatch, given: tuple[Any, Any]) -> None:
    """Precomputed reference log-probs must be (B, T), laid out like the batch's masks."""
    want = tuple(batch.chosen_ids.shape)
    got = [tuple(np.shape(g)) for g in given]
    if any(g != want for g in got):
        raise TabpoError(f"precomputed reference log-probs have shapes {got}, the batch {want}")


def missing_reference() -> TabpoError:
    """The error of asking for the reference under full fine-tuning without one."""
    return TabpoError(
        "full fine-tuning without a reference model (no ref_path, keep_reference off) has no "
        "reference to run: its log-probs must be precomputed (precompute_ref_log_probs) before "
        "the first step, and losses with a KL term cannot be used"
    )


def check_vocabularies(ref_path: str, policy: int, reference: int) -> None:
    """A reference model must score the policy's tokens: the same vocabulary size."""
    if policy != reference:
        raise TabpoError(
            f"reference model {ref_path} has a vocabulary of {reference}, the policy {policy}"
        )
