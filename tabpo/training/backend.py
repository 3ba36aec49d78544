"""The Backend protocol: everything that differs between MLX and PyTorch, on one screen.

The core hands a backend right-padded NumPy batches (``tabpo.data.batching.PairBatch``) and an
``Objective`` (a loss of the library with its hyperparameters); the backend runs the model,
calls the objective on its own arrays, and returns plain floats and NumPy arrays. Batching,
schedules, accumulation, logging, checkpoint cadence and metrics live in the core.

Canonical parameter names (for ``trainable_state`` / ``gradients``): Hugging Face names
without any wrapper prefix. Full fine-tuning: ``model.layers.0.self_attn.q_proj.weight``...
LoRA: ``model.layers.0.self_attn.q_proj.lora_A`` (r, in) and ``...lora_B`` (out, r), PEFT's
orientation, so ``W + scale * B @ A`` is the merged weight on both stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tabpo.data.batching import PairBatch
from tabpo.models.families import LORA_TARGETS

DTYPES = ("float32", "bfloat16", "float16")
FINETUNE_MODES = ("lora", "full")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on every layer; the same settings mean the same function on both backends."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelOptions:
    path: str
    dtype: str = "float32"
    finetune: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    device: str | None = None  # torch only: cuda, mps, cpu; None picks cuda > mps > cpu
    ref_path: str | None = None  # full fine-tuning: a separate reference model directory
    keep_reference: bool = True  # full fine-tuning: keep a frozen copy as the reference
    prefix_sharing: str = "auto"  # tabpo.data.layout.SHARING: fork each pair at its shared prefix


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with bias correction (torch's AdamW and mlx's with bias_correction=True)."""

    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class StepResult:
    """One micro-batch: the mean loss, the loss's metrics, the loss of every pair."""

    loss: float
    metrics: dict[str, float]
    per_pair: np.ndarray  # (B,)
    tokens: int  # non-padding tokens in the forward pass (chosen + rejected)


class Objective(Protocol):
    """A loss of the library with its hyperparameters bound (``tabpo.objective``)."""

    needs_reference: bool
    needs_kl: bool

    def __call__(
        self,
        policy_chosen: Any,
        policy_rejected: Any,
        ref_chosen: Any,
        ref_rejected: Any,
        chosen_mask: Any,
        rejected_mask: Any,
        chosen_weights: Any,
        rejected_weights: Any,
        chosen_kl: Any = None,
        rejected_kl: Any = None,
    ) -> tuple[Any, dict[str, Any]]:
        """``(per_pair (B,), metrics)`` in the arrays' own namespace."""
        ...


RefLogps = tuple[np.ndarray, np.ndarray]  # precomputed reference (B, T) chosen, rejected


class Backend(Protocol):
    name: str

    def load(self, options: ModelOptions) -> None:
        """Load the model (HF directory or hub id), wrap it for LoRA or full fine-tuning."""

    def logps(self, batch: PairBatch, *, reference: bool = False) -> RefLogps:
        """Per-token log-probs (B, T) of chosen and rejected, float32, 0 off the completion
        mask, no gradient. ``reference=True``: the adapter switched off (LoRA), or the
        reference model (full fine-tuning)."""

    def forward_backward(
        self, batch: PairBatch, objective: Objective, ref: RefLogps | None, scale: float
    ) -> StepResult:
        """One forward of the concatenated (2B, T) batch, the objective, and its gradient
        times ``scale`` added to the accumulated gradients. ``ref`` None: compute the
        reference on the fly (and the full-vocabulary KL if the objective needs it)."""

    def evaluate(self, batch: PairBatch, objective: Objective, ref: RefLogps | None) -> StepResult:
        """The same without gradients, in evaluation mode (no dropout)."""

    def setup_optimizer(self, settings: OptimizerSettings) -> None: ...

    def optimizer_step(self, learning_rate: float, max_grad_norm: float | None) -> float:
        """Apply AdamW to the accumulated gradients (clipped to ``max_grad_norm`` when
        given), zero them, and return the gradient norm before clipping."""

    def zero_grad(self) -> None:
        """Drop the accumulated gradients without a step."""

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients under canonical names, float32."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters under canonical names, float32."""

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None: ...

    def save_weights(self, directory: Path) -> None:
        """The adapter (PEFT format from torch, mlx-lm format from MLX) or the full model
        directory with its tokenizer, loadable by the stack that wrote it."""

    def save_state(self, directory: Path) -> None:
        """Optimizer state and RNG state, for an exact resume."""

    def load_state(self, directory: Path) -> None:
        """Restore ``save_weights`` + ``save_state`` output written by this backend."""

    def seed(self, seed: int) -> None: ...

    def drop_reference(self) -> None:
        """Free a separate reference model (full fine-tuning, ``ref_path``) once its
        log-probs are precomputed, so training holds one model; asking for the reference
        afterwards is an error. A no-op under LoRA (the reference is the adapter off)."""

    def peak_memory_gb(self) -> float: ...

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int]
    ) -> list[list[int]]:
        """Greedy continuations (KV cache, one batch) of token-id prompts, each cut before
        its first stop token; the policy as trained (adapter on), evaluation mode."""


def check_state(
    expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], *, where: str
) -> None:
    """A TabpoError unless ``given`` has exactly the names and shapes of ``expected``
    (name -> shape, canonical names), for loading weights into either backend."""
    from tabpo.common.errors import TabpoError

    missing = sorted(set(expected) - set(given))
    unknown = sorted(set(given) - set(expected))
    if missing or unknown:
        raise TabpoError(
            f"{where}: trainable state does not match the model "
            f"(missing: {', '.join(missing[:5]) or 'none'}; "
            f"unknown: {', '.join(unknown[:5]) or 'none'})"
        )
    for name, shape in expected.items():
        if tuple(given[name]) != tuple(shape):
            raise TabpoError(
                f"{where}: {name} has shape {tuple(given[name])}, the model {tuple(shape)}"
            )
