"""The PyTorch backend: transformers models, peft LoRA, AdamW (``tabpo.training.backend.Backend``).

One step runs chosen and rejected as one (2B, T) forward of the decoder; the LM head sees
only the completion positions (``backends._torch_logps``). The reference is the same model
with its adapter switched off under LoRA, a frozen copy (or ``ref_path``) under full
fine-tuning; it always runs in eval mode without gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tabpo.backends import _torch_dist as distributed
from tabpo.backends import _torch_load as loading
from tabpo.backends import _torch_params as params
from tabpo.backends._torch_logps import (
    DeviceBatch,
    completion_hidden,
    token_logps,
    token_logps_and_kl,
)
from tabpo.common.errors import TabpoError, reading
from tabpo.data.batching import PairBatch
from tabpo.losses import Objective
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

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
MASTER_FILE = "master_weights.pt"
SHARDED_DIR = "sharded"  # FSDP2: torch.distributed.checkpoint's files, one set per rank


class TorchBackend:
    """``Backend`` on torch + transformers + peft; call ``load`` first."""

    name = "torch"

    def __init__(self) -> None:
        self.model: nn.Module | None = None  # PeftModel under LoRA, else the causal LM
        self.reference: nn.Module | None = None  # full fine-tuning only
        self.tokenizer: Any = None  # full fine-tuning only, saved with the weights
        self.optimizer: torch.optim.Optimizer | None = None
        # float32 copies of half-precision trained weights, which AdamW updates (None: the
        # trained weights are float32 themselves, as LoRA factors always are under peft)
        self.master: dict[str, Tensor] | None = None
        self.device = torch.device("cpu")
        self.lora = True
        self.prefix_sharing = "auto"
        self.mask_kind: str | None = "bool"  # how the attention takes a fork mask
        self.par: Parallel | None = None  # torchrun's process group once joined

    def parallel(self) -> Parallel:
        if self.par is None:
            self.par = distributed.from_environment()
        return self.par

    # -- loading ---------------------------------------------------------------------------

    def load(self, options: ModelOptions) -> None:
        dtype = loading.TORCH_DTYPES[options.dtype]
        self.device = loading.pick_device(options.device)
        if dtype == torch.float64 and self.device.type == "mps":  # MPS has no float64
            self.device = torch.device("cpu")
        if self.parallel().world_size > 1 and self.device.type == "cuda":
            self.device = distributed.local_device() or self.device  # this rank's GPU
        if options.dtype == "float16" and options.finetune == "full" and self.device.type == "cuda":
            raise TabpoError(
                "float16 full fine-tuning on CUDA needs loss scaling, which tabpo does not do "
                "(its gradients underflow): use --dtype bfloat16 or float32"
            )
        sharded = self.parallel().world_size > 1 and options.finetune == "full"
        if sharded and options.dtype != "float32":
            raise TabpoError(
                "full fine-tuning on several processes (FSDP2) runs in float32 only: "
                "half-precision master weights are not sharded yet (use --dtype float32, "
                "or LoRA)"
            )
        model = loading.load_causal_lm(options.path, dtype, self.device)
        if options.gradient_checkpointing:
            loading.checkpoint_layers(model)
        self.lora = rules.source(options) == rules.ADAPTER_OFF
        self.prefix_sharing, self.mask_kind = loading.fork_mask_kind(model, options.prefix_sharing)
        self.optimizer, self.master = None, None
        self.reference = self.tokenizer = None
        self._probe(model, options)
        if self.lora:
            self.model = loading.wrap_lora(model, options.lora)
        else:
            self.model = model.requires_grad_(True)
            self.reference = loading.full_reference(options, model, dtype, self.device)
            self.tokenizer = loading.tokenizer_for(options.path)
            if sharded:  # after the reference copy, which stays whole
                distributed.shard(self.model)

    def _probe(self, model: nn.Module, options: ModelOptions) -> None:
        """tabpo's log-prob path against the model's own forward (``tabpo.training.probe``),
        before any adapter: the same function, or the model is refused."""
        head = model.get_output_embeddings()
        batch = probe.probe_batch(head.weight.shape[0])
        inputs = DeviceBatch(batch, self.device, "off")
        with torch.no_grad(), _mode(model, training=False):
            ours = inputs.sides(token_logps(completion_hidden(model, inputs), head, inputs.target))
            ids = torch.from_numpy(batch.chosen_ids).to(self.device)
            logits = model(input_ids=ids, use_cache=False).logits[0].float().cpu().numpy()
        theirs = probe.library_logps(logits, batch.chosen_ids[0])
        ours = params.to_numpy(ours[0])[0, 1:]
        probe.check_same_function(ours, theirs, path=options.path, dtype=options.dtype)

    @property
    def _net(self) -> nn.Module:
        """The trained module: the PeftModel under LoRA, the causal LM otherwise."""
        if self.model is None:
            raise TabpoError("no model loaded: call load() first")
        return self.model

    @property
    def _lm(self) -> nn.Module:
        """The causal LM itself (under LoRA, with the adapter layers injected)."""
        return self._net.get_base_model() if self.lora else self._net

    def _params(self) -> dict[str, nn.Parameter]:
        return params.trainable(self._net, lora=self.lora)

    # -- log-probs -------------------------------------------------------------------------

    def logps(self, batch: PairBatch, *, reference: bool = False) -> RefLogps:
        inputs = DeviceBatch(batch, self.device, self.prefix_sharing, self.mask_kind)
        with torch.no_grad(), _mode(self._net, training=False):
            if reference:
                rows, head = self._reference_rows(inputs)
            else:
                return self._policy_logps_numpy(inputs)
            chosen, rejected = inputs.sides(token_logps(rows, head, inputs.target))
        return params.to_numpy(chosen), None if rejected is None else params.to_numpy(rejected)

    def _policy_logps(self, inputs: DeviceBatch) -> Tensor:
        """The policy's log-probs (U,) of the completion tokens (through FSDP's hooks when
        the model is sharded)."""
        lm = self._lm

        def forward() -> Tensor:
            rows = completion_hidden(lm, inputs)
            return token_logps(rows, lm.get_output_embeddings(), inputs.target)

        return distributed.run(lm, forward)

    def _policy_logps_numpy(self, inputs: DeviceBatch) -> RefLogps:
        chosen, rejected = inputs.sides(self._policy_logps(inputs))
        return params.to_numpy(chosen), None if rejected is None else params.to_numpy(rejected)

    @contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        """The reference as a causal LM, in eval mode (``tabpo.training.reference``); the
        adapter is off inside (LoRA)."""
        if self.lora:
            with self._net.disable_adapter(), _mode(self._net, training=False):
                yield self._lm
        elif self.reference is not None:
            yield self.reference
        else:
            raise rules.missing_reference()

    def _reference_rows(self, inputs: DeviceBatch) -> tuple[Tensor, nn.Module]:
        """Reference hidden states (K, H) at the completion positions, and its LM head."""
        with torch.no_grad(), self._reference_model() as ref:
            rows = completion_hidden(ref, inputs)
            return rows, ref.get_output_embeddings()

    def _reference_logps(self, inputs: DeviceBatch) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            rows, head = self._reference_rows(inputs)
            return inputs.sides(token_logps(rows, head, inputs.target))

    def _terms(
        self, inputs: DeviceBatch, objective: Objective, ref: RefLogps | None
    ) -> tuple[tuple[Tensor, Tensor], Any, Any]:
        """Policy (B, T) pair with gradient, reference pair (or None) and KL pair (or None),
        the reference as ``rules.reference_use`` decides."""
        use = rules.reference_use(objective, ref)
        if use == rules.KL:
            lm = self._lm
            ref_rows, ref_head = self._reference_rows(inputs)

            def forward() -> tuple[Tensor, Tensor, Tensor]:
                rows = completion_hidden(lm, inputs)
                head = lm.get_output_embeddings()
                return token_logps_and_kl(rows, ref_rows, head, ref_head, inputs.target)

            lp, ref_lp, kl = distributed.run(lm, forward)
            return inputs.sides(lp), inputs.sides(ref_lp), inputs.sides(kl)
        reference = None
        if use == rules.RUN:
            reference = self._reference_logps(inputs)
        elif use == rules.GIVEN:
            assert ref is not None
            reference = inputs.given(ref)
        return inputs.sides(self._policy_logps(inputs)), reference, None

    # -- steps -----------------------------------------------------------------------------

    def _step(
        self, batch: PairBatch, objective: Objective, ref: RefLogps | None
    ) -> tuple[StepResult, Tensor]:
        inputs = DeviceBatch(batch, self.device, self.prefix_sharing, self.mask_kind)
        (pc, pr), reference, kl = self._terms(inputs, objective, ref)
        rc, rr = reference if reference is not None else (None, None)
        kc, kr = kl if kl is not None else (None, None)
        per_pair, metrics = objective(
            pc, pr, rc, rr,
            inputs.tensor(batch.chosen_mask), inputs.tensor(batch.rejected_mask),
            inputs.tensor(batch.chosen_weights), inputs.tensor(batch.rejected_weights),
            kc, kr,
        )  # fmt: skip
        loss = per_pair.mean()
        return StepResult.of(batch, loss, per_pair, metrics, params.to_numpy), loss

    def forward_backward(
        self, batch: PairBatch, objective: Objective, ref: RefLogps | None, scale: float
    ) -> StepResult:
        self._net.train()  # LoRA dropout on
        result, loss = self._step(batch, objective, ref)
        if distributed.is_sharded(self.model):  # FSDP's reduce-scatter averages: sum instead
            scale *= self.parallel().world_size
        (loss * scale).backward()
        return result

    def evaluate(self, batch: PairBatch, objective: Objective, ref: RefLogps | None) -> StepResult:
        with torch.no_grad(), _mode(self._net, training=False):
            return self._step(batch, objective, ref)[0]

    def logps_and_kl(self, batch: PairBatch) -> TokenValues:
        inputs = DeviceBatch(batch, self.device, self.prefix_sharing, self.mask_kind)
        with torch.no_grad(), _mode(self._net, training=False):
            ref_rows, ref_head = self._reference_rows(inputs)
            rows, head = completion_hidden(self._lm, inputs), self._lm.get_output_embeddings()
            values = token_logps_and_kl(rows, ref_rows, head, ref_head, inputs.target)
        pairs = [inputs.sides(v) for v in values]
        assert all(r is not None for _, r in pairs), "a KL is compared on pairs"
        policy, reference, kl = ((params.to_numpy(c), params.to_numpy(r)) for c, r in pairs)
        return TokenValues(policy, reference, kl)

    def objective_gradient(
        self, objective: Objective, batch: PairBatch, values: TokenValues, dtype: str
    ) -> ObjectiveGradient:
        wide = torch.float64 if dtype == FLOAT64 else torch.float32

        def tensor(x: np.ndarray | None, grad: bool = False) -> Tensor | None:
            return None if x is None else torch.tensor(x, dtype=wide, requires_grad=grad)

        leaves = [tensor(x, grad=True) for x in (*values.policy, *(values.kl or ()))]
        pc, pr, *kl = leaves
        ref = values.reference or (None, None)
        per_pair, metrics = objective(
            pc, pr, tensor(ref[0]), tensor(ref[1]),
            tensor(batch.chosen_mask), tensor(batch.rejected_mask),
            tensor(batch.chosen_weights), tensor(batch.rejected_weights), *kl,
        )  # fmt: skip
        loss = per_pair.mean()
        loss.backward()
        grads = [np.zeros(x.shape) if x.grad is None else params.to_numpy(x.grad)
                 for x in leaves if x is not None]  # fmt: skip
        return ObjectiveGradient(
            loss.item(), {k: float(v.detach()) for k, v in metrics.items()},
            (grads[0], grads[1]), (grads[2], grads[3]) if kl else None,
        )  # fmt: skip

    # -- optimizer -------------------------------------------------------------------------

    def setup_optimizer(self, settings: OptimizerSettings) -> None:
        """AdamW over the trained weights, or over float32 master copies of them when they
        are half precision: an update smaller than half a bf16 step would round away."""
        trained = self._params()
        self.master = None
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in trained.values()):
            self.master = {n: p.detach().float().clone() for n, p in trained.items()}
        self.optimizer = torch.optim.AdamW(
            list((self.master or trained).values()),
            lr=0.0,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )

    def optimizer_step(self, learning_rate: float, max_grad_norm: float | None) -> float:
        if self.optimizer is None:
            raise TabpoError("no optimizer: call setup_optimizer() first")
        params_ = self._params()
        if self.master is not None:  # the gradients move to the float32 copies
            for name, master in self.master.items():
                grad = params_[name].grad
                master.grad = None if grad is None else grad.float()
                params_[name].grad = None
        trained = list((self.master or params_).values())
        if isinstance(self.par, distributed.TorchGroup) and not distributed.is_sharded(self.model):
            self.par.sum_gradients(trained)
        norm = _grad_norm(trained)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for name, master in self.master.items():
                    params_[name].copy_(master)  # rounded to the model's dtype
        return norm

    # -- parameters ------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for p in self._params().values():
            p.grad = None

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients; a parameter no backward reached has a zero gradient."""
        return {
            name: params.to_numpy(p.grad) if p.grad is not None else np.zeros(p.shape, np.float32)
            for name, p in self._params().items()
        }

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trained weights, float32: the master copies where there are any."""
        return {name: params.to_numpy(p) for name, p in (self.master or self._params()).items()}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        params.assign(self._params(), tensors, where="load_trainable_state")
        if self.master is not None:
            params.assign(self.master, tensors, where="load_trainable_state")

    # -- files -----------------------------------------------------------------------------

    def save_weights(self, directory: Path) -> None:
        """Rank 0 writes (a sharded model is gathered to it first, as a Hugging Face
        directory); the other ranks write nothing."""
        directory = Path(directory)
        state = distributed.full_state(self._net) if distributed.is_sharded(self.model) else None
        if not self._writes:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._net.save_pretrained(str(directory), state_dict=state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    @property
    def _writes(self) -> bool:
        """Whether this process writes replicated files: rank 0 alone."""
        return self.parallel().rank == 0

    def save_state(self, directory: Path) -> None:
        """Optimizer state, master weights and RNG, from rank 0; a sharded model's weights
        and optimizer state in ``SHARDED_DIR``, every rank its shards."""
        directory = Path(directory)
        if distributed.is_sharded(self.model):
            assert self.optimizer is not None, "call setup_optimizer() first"
            distributed.save_sharded(self._net, self.optimizer, directory / SHARDED_DIR)
            if self._writes:
                torch.save(params.rng_state(), directory / RNG_FILE)
            return
        if not self._writes:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        if self.master is not None:  # the weights file holds them rounded: keep them exact
            torch.save(self.master, directory / MASTER_FILE)
        torch.save(params.rng_state(), directory / RNG_FILE)

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        if distributed.is_sharded(self.model):
            if self.optimizer is None or not (directory / SHARDED_DIR).is_dir():
                raise TabpoError(
                    f"{directory}: no {SHARDED_DIR}/ of sharded weights and optimizer state "
                    f"to resume from (or no optimizer: call setup_optimizer first)"
                )
            with reading(directory / SHARDED_DIR, "the sharded checkpoint"):
                distributed.load_sharded(self._net, self.optimizer, directory / SHARDED_DIR)
            with reading(directory / RNG_FILE, "the RNG state"):
                params.set_rng_state(torch.load(directory / RNG_FILE, weights_only=True))
            return
        current = self._params()
        saved = params.saved_weights(directory, current, lora=self.lora)
        params.assign(current, saved, where=str(directory))
        if self.master is not None:
            if (directory / MASTER_FILE).is_file():
                with reading(directory / MASTER_FILE, "the float32 master weights"):
                    saved = torch.load(directory / MASTER_FILE, weights_only=True)
            params.assign(self.master, saved, where=str(directory))
        if (directory / OPTIMIZER_FILE).is_file():
            if self.optimizer is None:
                raise TabpoError("call setup_optimizer() before load_state() to resume it")
            with reading(directory / OPTIMIZER_FILE, "the optimizer state"):
                state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu",
                                   weights_only=True)  # fmt: skip
                self.optimizer.load_state_dict(state)
        if (directory / RNG_FILE).is_file():
            with reading(directory / RNG_FILE, "the RNG state"):
                params.set_rng_state(torch.load(directory / RNG_FILE, weights_only=True))

    # -- misc ------------------------------------------------------------------------------

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every CUDA device too

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int]
    ) -> list[list[int]]:
        from tabpo.backends._torch_generate import greedy

        self.model.eval()  # left padding is masked, so any id pads
        return greedy(self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                      pad_id=stop_ids[0], device=self.device)  # fmt: skip

    def drop_reference(self) -> None:
        if self.reference is None:
            return
        self.reference = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_accelerator_memory_gb(self) -> float | None:
        """torch's peak CUDA allocation on a GPU; None elsewhere (MPS keeps no peak)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return None


def _grad_norm(trained: list[nn.Parameter]) -> float:
    """``sqrt(sum_p ||g_p||^2)`` over the parameters a backward reached (whole, when they
    are sharded)."""
    grads = [p.grad.detach().float() for p in trained if p.grad is not None]
    if not grads:
        return 0.0
    return float(distributed.full_tensor(torch.nn.utils.get_total_norm(grads)))


@contextmanager
def _mode(module: nn.Module, *, training: bool) -> Iterator[None]:
    """``module`` in train or eval mode inside the block, its previous mode after it."""
    previous = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(previous)
