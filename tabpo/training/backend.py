"""The Backend contract: what the training loop requires of a backend, on one screen.

The loop hands a backend right-padded NumPy batches (``tabpo.data.batching.PairBatch``) and an
``Objective`` (``tabpo.losses.Objective``: a loss with its hyperparameters bound); the backend
runs the model, calls the objective on its own arrays, and returns plain floats and NumPy
arrays. Batching, schedules, accumulation, logging, checkpoint cadence and metrics live in the
core, and so does every rule both backends must apply alike: the options checked here, the
reference rules of ``tabpo.training.reference``, the layout and placement of per-token values
of ``tabpo.data.layout``. A backend keeps only what its library forces on it.

Canonical parameter names (for ``trainable_state`` / ``gradients``): Hugging Face names
without any wrapper prefix. Full fine-tuning: ``model.layers.0.self_attn.q_proj.weight``...
LoRA: ``model.layers.0.self_attn.q_proj.lora_A`` (r, in) and ``...lora_B`` (out, r), PEFT's
orientation, so ``W + scale * B @ A`` is the merged weight on both stacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch
from tabpo.data.layout import SHARING
from tabpo.losses import Objective
from tabpo.losses.xp import to_float
from tabpo.models.families import LORA_TARGETS
from tabpo.training.parallel import Parallel

DTYPES = ("float32", "bfloat16", "float16")
# float64: not for training; the reference computation ``tabpo parity`` measures rounding
# against (on the CPU)
FLOAT64 = "float64"
FINETUNE_MODES = ("lora", "full")


def check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise TabpoError(f"{option} must be one of {', '.join(choices)} (got {value!r})")


def check_model_options(
    *, dtype: str, finetune: str, prefix_sharing: str, ref_path: str | None,
    dtypes: Sequence[str] = DTYPES,
) -> None:  # fmt: skip
    """The model options' values and their one contradiction, checked before any model loads
    (``ModelOptions`` and the training configuration both call this)."""
    check_choice("--dtype", dtype, dtypes)
    check_choice("--finetune", finetune, FINETUNE_MODES)
    check_choice("--prefix-sharing", prefix_sharing, SHARING)
    if ref_path and finetune == "lora":
        raise TabpoError(
            "--ref-model is for full fine-tuning; with LoRA the reference is the adapter-free model"
        )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on every layer; the same settings mean the same function on both backends.
    These defaults are the training configuration's defaults too."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_targets(self, available: Collection[str]) -> None:
        """A target the library would silently skip (or fail on) is named here with the
        model's linear layers (``available``: their last name components)."""
        if not self.target_modules:
            raise TabpoError("LoRA needs at least one target module")
        for target in self.target_modules:
            if target not in available:
                raise TabpoError(
                    f"LoRA target module '{target}' is not in the model "
                    f"(its linear layers: {', '.join(sorted(available))})"
                )


def seeded_lora_init(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """LoRA factors drawn from ``seed`` alone, so both backends start from the same function.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5), and mlx-lm's
    range), B = 0: the adapter starts as a no-op, as in both libraries.
    """
    rng = np.random.default_rng([seed, 0x10A])
    out = {}
    for name in sorted(state):
        shape = state[name].shape
        if name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


@dataclass(frozen=True)
class ModelOptions:
    """What to load and how; checked when built (``check_model_options``)."""

    path: str
    dtype: str = "float32"
    finetune: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    device: str | None = None  # torch only: cuda, mps, cpu; None picks cuda > mps > cpu
    ref_path: str | None = None  # full fine-tuning: a separate reference model directory
    keep_reference: bool = True  # full fine-tuning: keep a frozen copy as the reference
    prefix_sharing: str = "auto"  # tabpo.data.layout.SHARING: fork each pair at its prefix
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward

    def __post_init__(self) -> None:
        check_model_options(dtype=self.dtype, finetune=self.finetune, dtypes=(*DTYPES, FLOAT64),
                            prefix_sharing=self.prefix_sharing, ref_path=self.ref_path)  # fmt: skip


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

    @classmethod
    def of(
        cls, batch: PairBatch, loss: Any, per_pair: Any, metrics: dict[str, Any],
        to_numpy: Callable[[Any], np.ndarray],
    ) -> StepResult:  # fmt: skip
        """From a backend's own arrays (0-d ``loss`` and metrics, (B,) ``per_pair``);
        ``to_numpy`` is the backend's float32 copy to the host."""
        return cls(loss=to_float(loss), metrics={k: to_float(v) for k, v in metrics.items()},
                   per_pair=to_numpy(per_pair), tokens=batch.tokens)  # fmt: skip


RefLogps = tuple[np.ndarray, np.ndarray]  # precomputed reference (B, T) chosen, rejected


@dataclass(frozen=True)
class TokenValues:
    """An objective's per-token inputs as NumPy, each a (chosen, rejected) pair of (B, T)
    arrays: the policy's log-probs, the reference's (None: not needed) and the per-token
    KL to the reference (None: no KL term)."""

    policy: RefLogps
    reference: RefLogps | None = None
    kl: RefLogps | None = None


@dataclass(frozen=True)
class ObjectiveGradient:
    """An objective at given ``TokenValues``: its loss (mean over pairs), its metrics, and
    its gradient with respect to the policy's per-token log-probs and to the KL (None
    without a KL term), each (chosen, rejected) of (B, T)."""

    loss: float
    metrics: dict[str, float]
    policy: RefLogps
    kl: RefLogps | None


class Backend(Protocol):
    name: str

    def parallel(self) -> Parallel:
        """The processes of this run (``tabpo.training.parallel``): the library's process
        group when a launcher started several (joined on the first call), else ``Single``.
        Called before ``load``, which then places the model on this rank's device."""

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

    def logps_and_kl(self, batch: PairBatch) -> TokenValues:
        """Policy and reference log-probs and the per-token ``KL(pi_ref || pi_theta)``, each
        (B, T) of chosen and rejected, from the forward a loss with a KL term runs, 0 off
        the completion mask, no gradient (``tabpo parity``)."""

    def objective_gradient(
        self, objective: Objective, batch: PairBatch, values: TokenValues, dtype: str
    ) -> ObjectiveGradient:
        """The loss math alone, without the model: ``objective`` at ``values`` with the
        masks and weights of ``batch``, in the library's float32 (``dtype`` "float64":
        float64) arrays, and its gradient (``tabpo parity``)."""

    def setup_optimizer(self, settings: OptimizerSettings) -> None: ...

    def optimizer_step(self, learning_rate: float, max_grad_norm: float | None) -> float:
        """Sum the accumulated gradients over the ranks (``parallel``), apply AdamW to them
        (clipped to ``max_grad_norm`` when given), zero them, and return the gradient norm
        before clipping. A rank that ran no micro-batch adds zeros."""

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

    def peak_accelerator_memory_gb(self) -> float | None:
        """The library's own peak allocation on a GPU (CUDA, Metal), in GB; None on a CPU
        (the core reports the process's peak resident set for every backend)."""

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
