"""Proof that a converted or merged checkpoint is the same function as its source.

Source and result are each loaded by their own stack (transformers + peft, or mlx-lm), in
float32, and score the same seeded random token sequences:

    l[b, t] = log_softmax(z[b, t-1])[ids[b, t]]        t = 1 .. T-1, float64
    diff    = max_{b,t} |l_source - l_result|

Tolerances: 1e-4 when no weight was rounded (the stacks agree to ~1e-6 on tiny models); when
weights were rounded to a narrower dtype (``--dtype``, or a merge into bf16/fp16 weights) the
result is a slightly different function, so bf16 allows 0.1 and fp16 0.02 (on the tiny
test models, rounding float32 weights to bf16 moved log-probs by up to 0.01, to fp16 by 0.001).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tabpo.common.errors import TabpoError

SEQUENCES, LENGTH, SEED = 3, 32, 0
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
_PACKAGES = ("torch", "transformers", "peft", "mlx", "mlx_lm")


@dataclass(frozen=True)
class Side:
    """One checkpoint as a stack loads it: a model directory, maybe with an adapter."""

    stack: str  # "torch" or "mlx"
    model: Path
    adapter: Path | None = None
    overrides: dict[str, Any] | None = None  # mlx-lm's model_config (config.json fixes)


@dataclass(frozen=True)
class Verification:
    max_diff: float
    mean_diff: float
    tolerance: float
    source: str  # stack that scored the source
    result: str  # stack that scored the result


def missing_packages() -> list[str]:
    return [p for p in _PACKAGES if importlib.util.find_spec(p) is None]


def should_verify(requested: bool | None) -> bool:
    """``None`` (the default): verify when both stacks are installed; ``True``: they must be."""
    if requested is False:
        return False
    missing = missing_packages()
    if missing and requested:
        raise TabpoError(f"--verify needs both stacks: {', '.join(missing)} not installed")
    return not missing


def verified(
    found: list[Verification], requested: bool | None
) -> tuple[Verification | None, str | None]:
    """The verification made, else why none was (``--no-verify``, or a stack missing)."""
    if found:
        return found[0], None
    if requested is False:
        return None, "not verified (--no-verify)"
    return None, f"not verified: {', '.join(missing_packages())} not installed"


def token_ids(vocab: int) -> np.ndarray:
    """(SEQUENCES, LENGTH) seeded token ids, the same for every run."""
    return np.random.default_rng(SEED).integers(0, vocab, size=(SEQUENCES, LENGTH))


def _gather(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)[:, :-1]  # (B, T-1, V): position t-1 predicts token t
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def _torch_logits(side: Side, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(side.model), dtype=torch.float32)
    if side.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(side.adapter))
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def _mlx_logits(side: Side, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.utils import load_adapters, load_model

    model, _ = load_model(side.model, model_config=side.overrides)
    if side.adapter is not None:
        load_adapters(model, str(side.adapter))
    model.set_dtype(mx.float32)
    model.eval()
    return np.array(model(mx.array(ids)).astype(mx.float32))


def logps(side: Side, ids: np.ndarray) -> np.ndarray:
    """Per-token log-probs (B, T-1) of ``ids`` under ``side``; a TabpoError if the stack
    cannot load it (which is itself a failed verification)."""
    what = side.model if side.adapter is None else side.adapter
    try:
        logits = (_torch_logits if side.stack == "torch" else _mlx_logits)(side, ids)
    except Exception as exc:  # any loader failure means the checkpoint does not load
        label = "transformers/peft" if side.stack == "torch" else "mlx-lm"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TabpoError(f"verification: {label} cannot load {what}: {first}") from exc
    return _gather(logits, ids)


def verify(source: Side, result: Side, *, vocab: int, tolerance: float) -> Verification:
    """Score both sides and compare; a TabpoError when the difference exceeds ``tolerance``."""
    ids = token_ids(vocab)
    diff = np.abs(logps(source, ids) - logps(result, ids))
    found = Verification(
        float(diff.max()), float(diff.mean()), tolerance, source.stack, result.stack
    )
    if not found.max_diff <= tolerance:  # NaN fails too
        raise TabpoError(
            f"verification failed: log-probs of the result ({result.stack}) differ from the "
            f"source ({source.stack}) by up to {found.max_diff:.3g} (mean {found.mean_diff:.3g}, "
            f"tolerance {tolerance:g}); nothing was written"
        )
    return found
