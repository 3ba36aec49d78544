"""The MLX backend: mlx-lm models, LoRA on every layer or full fine-tuning, AdamW.

One forward of the inner model gives the hidden states of chosen and rejected, stacked
(2B, T) or forked at their shared prefix (``tabpo.data.layout``); the LM head runs on completion
rows only (``_mlx_logps``). The reference is the policy with its adapter switched off
(LoRA: every LoRA scale 0, no second model), a frozen copy of the initial model or the
model at ``ref_path`` (full fine-tuning), or precomputed log-probs. Gradients of
micro-batches are summed in float32 until ``optimizer_step``.

LoRA's A factors are drawn from MLX's global RNG when the model loads: call ``seed`` first.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from tabpo.backends import _mlx_dist as distributed
from tabpo.backends import _mlx_io as io
from tabpo.backends._mlx_logps import Forward, as_mx, completion_rows, token_logps
from tabpo.backends._mlx_model import (
    adapter_off,
    apply_lora,
    canonical,
    checkpoint_layers,
    from_canonical,
    load_model,
    resolve,
    to_numpy,
    widened,
)
from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch, split_rows
from tabpo.losses import Objective
from tabpo.models.families import ModelInfo
from tabpo.training import probe
from tabpo.training import reference as rules
from tabpo.training.backend import (
    FLOAT64,
    ModelOptions,
    ObjectiveGradient,
    OptimizerSettings,
    RefLogps,
    StepResult,
    TokenValues,
)
from tabpo.training.parallel import Parallel

# Reference log-probs (chosen, rejected) and, for KL losses, (reference model, its rows).
_RefInputs = tuple[tuple[mx.array, mx.array] | None, tuple[nn.Module, mx.array] | None]


class MlxBackend:
    """The ``Backend`` contract (tabpo/training/backend.py) on MLX and mlx-lm."""

    name = "mlx"

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.info: ModelInfo | None = None
        self.lora_parameters: dict[str, Any] | None = None  # mlx-lm's, None when full
        self._reference_model: nn.Module | None = None  # full fine-tuning only
        self._optimizer: optim.AdamW | None = None
        self._grads: Any = None  # float32 tree of summed micro-batch gradients
        self._master: Any = None  # float32 copies of half-precision trained weights
        self.prefix_sharing = "auto"  # tabpo.data.layout.SHARING
        self.par: Parallel | None = None  # mlx.launch's group once joined

    def parallel(self) -> Parallel:
        if self.par is None:
            self.par = distributed.from_environment()
        return self.par

    # -- model ---------------------------------------------------------------------------

    def load(self, options: ModelOptions) -> None:
        self.info = resolve(options.path)
        self.prefix_sharing = options.prefix_sharing
        if options.dtype == FLOAT64:  # parity's reference computation: only the CPU has it
            mx.set_default_device(mx.cpu)
        self.model, self.tokenizer = load_model(self.info, options.dtype)
        self._probe(self.model, options)
        if options.gradient_checkpointing:
            checkpoint_layers(self.model)
        self._reference_model, self._grads = None, None
        where = rules.source(options)
        if where == rules.ADAPTER_OFF:
            self.lora_parameters = apply_lora(self.model, options.lora)
            if options.dtype == FLOAT64:  # the factors too (otherwise float32, as in peft)
                self.model.set_dtype(mx.float64)
            return
        self.lora_parameters = None
        self.model.unfreeze()
        if where == rules.SEPARATE:
            assert options.ref_path is not None
            self._reference_model = self._frozen(resolve(options.ref_path), options.dtype)
        elif where == rules.INITIAL_COPY:
            self._reference_model = self._frozen(self.info, options.dtype)

    @staticmethod
    def _probe(model: nn.Module, options: ModelOptions) -> None:
        """tabpo's log-prob path against mlx-lm's own forward (``tabpo.training.probe``),
        before any adapter: the same function, or the model is refused."""
        batch = probe.probe_batch(model.args.vocab_size)
        fwd = Forward(batch, "off")
        model.eval()
        ours = to_numpy(token_logps(model, fwd.hidden(model), fwd)[0])[0, 1:]
        logits = to_numpy(model(fwd.ids)[0])
        theirs = probe.library_logps(logits, batch.chosen_ids[0])
        probe.check_same_function(ours, theirs, path=options.path, dtype=options.dtype)

    def _frozen(self, info: ModelInfo, dtype: str) -> nn.Module:
        model, _ = load_model(info, dtype)
        model.freeze()
        rules.check_vocabularies(info.path, self._policy.args.vocab_size, model.args.vocab_size)
        return model

    @property
    def _policy(self) -> nn.Module:
        if self.model is None:
            raise TabpoError("no model: call load() first")
        return self.model

    def _reference(self) -> tuple[nn.Module, AbstractContextManager]:
        """The module that computes the reference (``tabpo.training.reference``), and the
        context it must run in."""
        if self.lora_parameters is not None:
            return self._policy, adapter_off(self._policy)
        if self._reference_model is None:
            raise rules.missing_reference()
        return self._reference_model, nullcontext()

    # -- forward -------------------------------------------------------------------------

    def _reference_forward(self, fwd: Forward) -> tuple[nn.Module, mx.array, mx.array]:
        """Reference model, its completion rows (U, H) and log-probs (2B, T), evaluated now
        (inside the adapter-off context) and cut from any gradient."""
        model, context = self._reference()
        with context:
            hidden = fwd.hidden(model)
            logps, _ = token_logps(model, hidden, fwd)
            rows = completion_rows(hidden, fwd.targets)
            mx.eval(logps, rows)
        return model, mx.stop_gradient(rows), mx.stop_gradient(logps)

    def _reference_inputs(
        self, batch: PairBatch, fwd: Forward, objective: Objective, ref: Any
    ) -> _RefInputs:
        """What the objective needs of the reference, as ``rules.reference_use`` decides."""
        use = rules.reference_use(objective, ref)
        if use == rules.KL:
            model, rows, logps = self._reference_forward(fwd)
            return split_rows(logps, batch.size), (model, rows)
        if use == rules.RUN:
            return split_rows(self._reference_forward(fwd)[2], batch.size), None
        if use == rules.GIVEN:
            rules.check_given(batch, ref)
            return (as_mx(ref[0]), as_mx(ref[1])), None
        return None, None

    def _loss_fn(self, batch: PairBatch, objective: Objective, ref: Any, scale: float):
        """``f() -> (scale * loss, (loss, per_pair, metrics))``, the policy forward inside."""
        fwd = Forward(batch, self.prefix_sharing)
        ref_logps, kl_ref = self._reference_inputs(batch, fwd, objective, ref)
        rc, rr = ref_logps if ref_logps is not None else (None, None)
        masks = [as_mx(batch.chosen_mask), as_mx(batch.rejected_mask)]
        weights = [as_mx(batch.chosen_weights), as_mx(batch.rejected_weights)]
        model = self._policy

        def f() -> tuple[mx.array, tuple[mx.array, mx.array, dict[str, mx.array]]]:
            logps, kl = token_logps(model, fwd.hidden(model), fwd, kl_ref)
            pc, pr = split_rows(logps, batch.size)
            ckl, rkl = split_rows(kl, batch.size) if kl is not None else (None, None)
            per_pair, metrics = objective(pc, pr, rc, rr, *masks, *weights, ckl, rkl)
            loss = mx.mean(per_pair)
            return loss * scale, (loss, per_pair, metrics)

        return f

    @staticmethod
    def _result(batch: PairBatch, loss: mx.array, per_pair: mx.array, metrics: dict) -> StepResult:
        mx.eval(loss, per_pair, [v for v in metrics.values() if isinstance(v, mx.array)])
        return StepResult.of(batch, loss, per_pair, metrics, to_numpy)

    def logps(self, batch: PairBatch, *, reference: bool = False) -> RefLogps:
        fwd = Forward(batch, self.prefix_sharing)
        if reference:
            logps = self._reference_forward(fwd)[2]
        else:
            model = self._policy
            model.eval()
            logps, _ = token_logps(model, fwd.hidden(model), fwd)
        chosen, rejected = split_rows(logps, batch.size)
        return to_numpy(chosen), None if rejected is None else to_numpy(rejected)

    def forward_backward(
        self, batch: PairBatch, objective: Objective, ref: RefLogps | None, scale: float
    ) -> StepResult:
        self._policy.train()  # LoRA dropout on
        f = self._loss_fn(batch, objective, ref, scale)
        (_, (loss, per_pair, metrics)), grads = nn.value_and_grad(self._policy, f)()
        grads = tree_map(widened, grads)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(self._grads)
        return self._result(batch, loss, per_pair, metrics)

    def evaluate(self, batch: PairBatch, objective: Objective, ref: RefLogps | None) -> StepResult:
        self._policy.eval()
        _, (loss, per_pair, metrics) = self._loss_fn(batch, objective, ref, 1.0)()
        return self._result(batch, loss, per_pair, metrics)

    def logps_and_kl(self, batch: PairBatch) -> TokenValues:
        fwd = Forward(batch, self.prefix_sharing)
        reference, rows, ref_logps = self._reference_forward(fwd)
        model = self._policy
        model.eval()
        logps, kl = token_logps(model, fwd.hidden(model), fwd, (reference, rows))
        assert kl is not None
        pairs = [split_rows(x, batch.size) for x in (logps, ref_logps, kl)]
        assert all(r is not None for _, r in pairs), "a KL is compared on pairs"
        policy, ref, kls = ((to_numpy(c), to_numpy(r)) for c, r in pairs)
        return TokenValues(policy, ref, kls)

    def objective_gradient(
        self, objective: Objective, batch: PairBatch, values: TokenValues, dtype: str
    ) -> ObjectiveGradient:
        wide = mx.float64 if dtype == FLOAT64 else mx.float32

        def array(x: np.ndarray | None) -> mx.array | None:  # (mx.array(x) alone: float32)
            return None if x is None else mx.array(np.asarray(x), dtype=wide)

        ref = values.reference or (None, None)
        fixed = [array(x) for x in (*ref, batch.chosen_mask, batch.rejected_mask,
                                    batch.chosen_weights, batch.rejected_weights)]  # fmt: skip

        def f(leaves: list[mx.array]) -> tuple[mx.array, dict[str, mx.array]]:
            pc, pr, *kl = leaves
            per_pair, metrics = objective(pc, pr, *fixed, *kl)
            return mx.mean(per_pair), metrics

        leaves = [array(x) for x in (*values.policy, *(values.kl or ()))]
        (loss, metrics), grads = mx.value_and_grad(f)(leaves)
        g = [to_numpy(x) for x in grads]
        return ObjectiveGradient(loss.item(), {k: float(v.item()) for k, v in metrics.items()},
                                 (g[0], g[1]), (g[2], g[3]) if values.kl else None)  # fmt: skip

    # -- optimizer -----------------------------------------------------------------------

    def setup_optimizer(self, settings: OptimizerSettings) -> None:
        """AdamW with bias correction, the update torch's AdamW makes; the learning rate is
        set at every step by the core's schedule."""
        self._optimizer = optim.AdamW(
            learning_rate=0.0,
            betas=list(settings.betas),
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            bias_correction=True,
        )
        # half-precision trained weights: AdamW updates float32 master copies (an update
        # smaller than half a bf16 step would round away), the model gets them rounded
        trained = self._policy.trainable_parameters()
        half = any(p.dtype in (mx.bfloat16, mx.float16) for _, p in tree_flatten(trained))
        self._master = tree_map(lambda p: p.astype(mx.float32), trained) if half else None

    def _require_optimizer(self) -> optim.AdamW:
        if self._optimizer is None:
            raise TabpoError("no optimizer: call setup_optimizer() first")
        return self._optimizer

    def optimizer_step(self, learning_rate: float, max_grad_norm: float | None) -> float:
        optimizer, model = self._require_optimizer(), self._policy
        grads = self._grads
        if isinstance(self.par, distributed.MlxGroup):  # a rank without micro-batches adds 0
            if grads is None:
                grads = tree_map(lambda p: mx.zeros(p.shape, mx.float32),
                                 model.trainable_parameters())  # fmt: skip
            grads = self.par.sum_gradients(grads)
        if grads is None:
            raise TabpoError("no gradients to apply: call forward_backward() first")
        if max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
        optimizer.learning_rate = learning_rate
        if self._master is not None:
            self._master = optimizer.apply_gradients(grads, self._master)
            model.update(tree_map(lambda m, p: m.astype(p.dtype), self._master,
                                  model.trainable_parameters()))  # fmt: skip
        else:  # the update keeps each parameter's dtype only if the gradient has it too
            grads = tree_map(lambda g, p: g.astype(p.dtype), grads, model.trainable_parameters())
            optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, norm)
        if self._master is not None:
            mx.eval(self._master)
        self._grads = None
        return float(norm.item())

    # -- state ---------------------------------------------------------------------------

    def zero_grad(self) -> None:
        self._grads = None

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients (zeros when none are pending)."""
        grads = self._grads
        if grads is None:
            grads = tree_map(mx.zeros_like, self._policy.trainable_parameters())
        return canonical(grads)

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trained weights, float32: the master copies where there are any."""
        trained = self._master if self._master is not None else self._policy.trainable_parameters()
        return canonical(trained)

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        self._policy.update(from_canonical(self._policy, state))
        mx.eval(self._policy.parameters())
        if self._master is not None:
            self._master = tree_map(lambda p: p.astype(mx.float32),
                                    from_canonical(self._policy, state))  # fmt: skip

    def save_weights(self, directory: Path) -> None:
        """Rank 0 writes (every rank holds the same weights); the others write nothing."""
        if self.parallel().rank != 0:
            return
        directory = Path(directory)
        if self.lora_parameters is not None:
            io.save_adapter(self._policy, directory, self.lora_parameters)
        else:
            assert self.info is not None
            io.save_model_dir(self._policy, self.info, self.tokenizer, directory)

    def save_state(self, directory: Path) -> None:
        if self.parallel().rank != 0:
            return
        io.save_optimizer(self._require_optimizer(), Path(directory))
        if self._master is not None:  # the weights file holds them rounded: keep them exact
            io.save_master(self._master, Path(directory))
        io.save_rng(Path(directory))

    def load_state(self, directory: Path) -> None:
        """Weights (``save_weights``), optimizer and RNG state (``save_state``) of one
        checkpoint directory; pending gradients are dropped."""
        directory, optimizer = Path(directory), self._require_optimizer()
        lora = self.lora_parameters is not None
        weights = io.read_weights(self._policy, directory, lora=lora)
        self._policy.update(tree_unflatten(weights))
        mx.eval(self._policy.parameters())
        if self._master is not None:  # the model's own tree, so it matches its gradients
            saved = dict(io.load_master(directory) or weights)
            self._master = tree_map_with_path(lambda name, p: saved[name].astype(mx.float32),
                                              self._policy.trainable_parameters())  # fmt: skip
        io.load_optimizer(optimizer, directory)
        io.load_rng(directory)
        self._grads = None

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int]
    ) -> list[list[int]]:
        from tabpo.backends._mlx_generate import greedy

        self._policy.eval()
        return greedy(self._policy, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)

    def drop_reference(self) -> None:
        self._reference_model = None
        mx.clear_cache()

    def peak_accelerator_memory_gb(self) -> float | None:
        """MLX's peak allocation on a Metal GPU; None on the CPU, where it is part of the
        process's resident set, which the core reports."""
        return mx.get_peak_memory() / 1e9 if mx.metal.is_available() else None
