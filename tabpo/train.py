"""The training loop, written once for every backend.

A step consumes ``batch_size * gradient_accumulation_steps`` pairs of a seeded per-epoch
permutation, as micro-batches whose gradients are scaled by their share of the step's pairs,
so k accumulated micro-batches of B equal one batch of kB. Everything a backend does not
have to know (data order, schedule, accumulation, reference cache, evaluation, logging,
checkpoints, stopping) lives here.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tabpo import config as cfg
from tabpo import refcache
from tabpo.batching import PairBatch, batches, collate
from tabpo.checkpoint import (
    TrainerState,
    publish_files,
    read_state,
    resolve_checkpoint,
    write_dir,
    write_state,
)
from tabpo.data import read_preferences
from tabpo.encoding import EncodedPair, EncodeStats, encode_pairs, load_tokenizer, pad_id
from tabpo.errors import TabpoError
from tabpo.losses import Objective, get
from tabpo.models.families import inspect_model_dir
from tabpo.schedule import learning_rate, warmup_steps
from tabpo.tracking import MetricsLog, Throughput, combine

if TYPE_CHECKING:
    from tabpo.backends.base import Backend, StepResult


class NonFiniteLoss(TabpoError):
    """Training stopped on a non-finite loss; the message is the diagnosis."""


class Callbacks:
    """What the loop reports; the CLI draws progress bars from it. All optional."""

    def phase(self, name: str, total: int) -> None: ...

    def advance(self, phase: str, n: int = 1) -> None: ...

    def log(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass
class Dataset:
    pairs: list[EncodedPair]
    stats: EncodeStats
    path: str
    lines: dict[int, int] = field(default_factory=dict)  # pair index -> line in the file


def load_dataset(path: str, tokenizer: Any, c: cfg.TrainConfig) -> Dataset:
    examples, _ = read_preferences(path)
    try:
        pairs, stats = encode_pairs(
            tokenizer,
            examples,
            max_length=c.max_length,
            field_weights=c.field_weight_map(),
            diff_factor=c.diff_factor,
            align=c.align,
        )
    except TabpoError as exc:
        raise TabpoError(f"{path}: {exc}") from None
    kinds = {p.rejected_ids is None for p in pairs}
    if len(kinds) > 1:
        raise TabpoError(f"{path}: mixes preference pairs and prompt/completion records")
    if True in kinds and get(c.loss).needs_pairs:
        raise TabpoError(
            f"{path} holds prompt/completion records, but loss '{c.loss}' needs chosen and "
            f"rejected pairs (use --loss sft, or build pairs with tabpo pairs)"
        )
    return Dataset(pairs, stats, path, {p.index: p.line for p in pairs})


def step_pairs(n: int, per_step: int, seed: int, epoch: int, epoch_step: int) -> np.ndarray:
    """Indices (into the pair list) of one step: a slice of epoch ``epoch``'s permutation."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[epoch_step * per_step : (epoch_step + 1) * per_step]


@dataclass
class Run:
    """Everything one training run holds; ``train`` builds it and steps it."""

    c: cfg.TrainConfig
    backend: Backend
    objective: Objective
    train: Dataset
    eval: Dataset | None
    pad: int
    output: Path
    callbacks: Callbacks
    ref_train: refcache.RefTable | None = None
    ref_eval: refcache.RefTable | None = None
    state: TrainerState = field(default_factory=TrainerState)

    @property
    def per_step(self) -> int:
        return self.c.batch_size * self.c.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train.pairs) / self.per_step)

    # -- one optimizer step ---------------------------------------------------------------

    def step(self) -> dict[str, float]:
        s = self.state
        chosen = step_pairs(len(self.train.pairs), self.per_step, self.c.seed, s.epoch,
                            s.epoch_step)  # fmt: skip
        parts, tokens = [], 0
        for start in range(0, len(chosen), self.c.batch_size):
            micro = [self.train.pairs[i] for i in chosen[start : start + self.c.batch_size]]
            batch = collate(micro, self.pad)
            ref = self.ref_train.for_batch(batch) if self.ref_train else None
            result = self.backend.forward_backward(
                batch, self.objective, ref, scale=len(micro) / len(chosen)
            )
            self.check_finite(result, batch)
            parts.append((len(micro), {"loss": result.loss, **result.metrics}))
            tokens += result.tokens
        lr = learning_rate(s.step, base=self.c.learning_rate, total=s.total_steps,
                           warmup=self.warmup, kind=self.c.lr_scheduler)  # fmt: skip
        grad_norm = self.backend.optimizer_step(lr, self.c.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(
                f"step {s.step + 1}: the gradient norm is {grad_norm} although the loss is "
                f"finite; weights after this step are not saved"
            )
        s.step += 1
        s.num_tokens += tokens
        s.epoch_step += 1
        if s.epoch_step >= self.steps_per_epoch:
            s.epoch, s.epoch_step = s.epoch + 1, 0
        metrics = combine(parts)
        return {"loss": metrics.pop("loss"), "grad_norm": grad_norm, "learning_rate": lr,
                "num_tokens": s.num_tokens, **metrics, "_tokens": tokens}  # fmt: skip

    def check_finite(self, result: StepResult, batch: PairBatch) -> None:
        if math.isfinite(result.loss):
            return
        bad = [int(i) for i, v in zip(batch.indices, result.per_pair, strict=True)
               if not math.isfinite(v)]  # fmt: skip
        terms = [k for k, v in result.metrics.items() if not math.isfinite(v)] or ["loss"]
        lines = ", ".join(f"{i} (line {self.train.lines.get(i, '?')})" for i in bad)
        raise NonFiniteLoss(
            f"non-finite loss at step {self.state.step + 1}: non-finite terms "
            f"{', '.join(terms)}; pairs {lines or '?'} of {self.train.path}; the last "
            f"checkpoint is left as it was"
        )

    @property
    def warmup(self) -> int:
        return warmup_steps(self.state.total_steps, self.c.warmup_ratio, self.c.warmup_steps)

    # -- evaluation and checkpoints --------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        assert self.eval is not None
        parts = []
        self.callbacks.phase("eval", len(self.eval.pairs))
        for batch in batches(self.eval.pairs, self.c.eval_batch_size, pad_id=self.pad):
            ref = self.ref_eval.for_batch(batch) if self.ref_eval else None
            result = self.backend.evaluate(batch, self.objective, ref)
            parts.append((len(batch.indices), {"loss": result.loss, **result.metrics}))
            self.callbacks.advance("eval", len(batch.indices))
        return {f"eval_{k}": v for k, v in combine(parts).items()}

    def checkpoint(self) -> Path:
        target = self.output / f"checkpoint-{self.state.step}"

        def fill(tmp: Path) -> None:
            self.backend.save_weights(tmp)
            self.backend.save_state(tmp)
            write_state(tmp, self.state, cfg.to_yaml(self.c))

        write_dir(target, fill)
        self.callbacks.message(f"saved {target}")
        return target

    def publish_final(self) -> None:
        """The final weights at the top of the output directory, loadable by their stack."""
        tmp = self.output / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.backend.save_weights(tmp)
        publish_files(tmp, self.output)
        tmp.rmdir()


# -- setting up and running ---------------------------------------------------------------


def prepare_output(c: cfg.TrainConfig) -> tuple[Path, TrainerState | None, Path | None]:
    """The output directory (refused if it exists unless --force or --resume) and, on resume,
    the checkpoint's trainer state."""
    output = Path(c.output or "")
    if c.resume:
        checkpoint = resolve_checkpoint(c.resume)
        return output, read_state(checkpoint), checkpoint
    if output.exists() and any(output.iterdir()) and not c.force:
        raise TabpoError(f"output directory {output} exists (use --force or --resume)")
    return output, None, None


def reference_table(run: Run, data: Dataset, *, name: str) -> refcache.RefTable:
    """Reference log-probs of every pair of ``data``: from the cache, or computed once."""
    c = run.c
    ref_source = c.ref_model or c.model or ""
    weights = refcache.weights_digest(ref_source)
    key = refcache.cache_key(weights, data.pairs, backend=run.backend.name, dtype=c.dtype)
    path = Path(c.ref_cache_dir or refcache.default_cache_dir()) / f"{key}.safetensors"
    table = refcache.load(path, key)
    if table is not None:
        run.callbacks.message(f"reference log-probs of {name}: cached ({path})")
        return table
    run.callbacks.phase(f"reference ({name})", len(data.pairs))
    # full fine-tuning without --ref-model: the reference is the policy before any step
    separate = c.finetune == "lora" or c.ref_model is not None
    table = refcache.compute(
        lambda b: run.backend.logps(b, reference=separate),
        data.pairs,
        batch_size=c.eval_batch_size,
        pad_id=run.pad,
        progress=lambda n: run.callbacks.advance(f"reference ({name})", n),
    )
    refcache.save(table, path, key)
    return table


def train(c: cfg.TrainConfig, backend: Backend, callbacks: Callbacks | None = None) -> Run:
    """Run the whole training job described by ``c``; returns the finished run."""
    from tabpo.backends.base import LoraSettings, ModelOptions, OptimizerSettings

    callbacks = callbacks or Callbacks()
    cfg.validate(c)
    output, resumed, checkpoint = prepare_output(c)
    inspect_model_dir(c.model or "")  # a clear error before any data is read
    if c.ref_model:
        inspect_model_dir(c.ref_model)
    tokenizer = load_tokenizer(c.model or "")
    train_data = load_dataset(c.data or "", tokenizer, c)
    eval_data = load_dataset(c.eval_data, tokenizer, c) if c.eval_data else None
    _report_encoding(callbacks, train_data)
    precompute = cfg.use_precomputed_reference(c)
    objective = get(c.loss).bind(**c.loss_hparams())
    lora = LoraSettings(c.lora_rank, c.lora_alpha, c.lora_dropout, c.target_modules())
    backend.seed(c.seed)
    backend.load(
        ModelOptions(
            path=c.model or "",
            dtype=c.dtype,
            finetune=c.finetune,
            lora=lora,
            device=c.device,
            ref_path=c.ref_model,
            keep_reference=objective.needs_reference and not precompute,
        )
    )
    if c.finetune == "lora":  # the same start on every backend, whatever its own init
        backend.load_trainable_state(seeded_lora_init(backend.trainable_state(), c.seed))
    run = Run(c, backend, objective, train_data, eval_data, pad_id(tokenizer), output, callbacks)
    if precompute:  # before any resume: for full fine-tuning the reference is the start
        run.ref_train = reference_table(run, train_data, name="train")
        if eval_data:
            run.ref_eval = reference_table(run, eval_data, name="eval")
    backend.setup_optimizer(OptimizerSettings(weight_decay=c.weight_decay))
    if checkpoint is not None and resumed is not None:
        backend.load_state(checkpoint)
        run.state = resumed
        callbacks.message(f"resumed from {checkpoint} at step {resumed.step}")
    total = c.max_steps or math.ceil(c.epochs * run.steps_per_epoch)
    run.state.total_steps = total
    if c.force and output.exists():  # only now: a run that failed to start loses nothing
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(cfg.to_yaml(c))
    _loop(run)
    return run


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


def _loop(run: Run) -> None:
    c, s, log = run.c, run.state, MetricsLog(run.output / "metrics.jsonl")
    speed = Throughput()
    run.callbacks.phase("train", s.total_steps - s.step)
    last_saved = s.step
    while s.step < s.total_steps:
        record = run.step()
        speed.add(int(record.pop("_tokens")))
        if s.step % c.logging_steps == 0 or s.step == s.total_steps:
            record = {"step": s.step, "epoch": round(s.epoch + s.epoch_step / max(
                run.steps_per_epoch, 1), 4), **record, **speed.read(),
                "peak_memory_gb": run.backend.peak_memory_gb()}  # fmt: skip
            log.write(record)
            run.callbacks.log(record)
        run.callbacks.advance("train")
        if run.eval and c.eval_steps and s.step % c.eval_steps == 0 and s.step < s.total_steps:
            _log_eval(run, log)
        if c.save_steps and s.step % c.save_steps == 0 and s.step < s.total_steps:
            run.checkpoint()
            last_saved = s.step
        if run.callbacks.should_stop():
            if s.step != last_saved:
                run.checkpoint()
            run.callbacks.message(f"stopped at step {s.step}; resume with --resume")
            return
    if run.eval:
        _log_eval(run, log)
    run.checkpoint()
    run.publish_final()


def _log_eval(run: Run, log: MetricsLog) -> None:
    record = {"step": run.state.step, **run.evaluate()}
    log.write(record)
    run.callbacks.log(record)


def _report_encoding(callbacks: Callbacks, data: Dataset) -> None:
    s = data.stats
    callbacks.message(
        f"{data.path}: {s.encoded} pairs; skipped {s.skipped_too_long} too long, "
        f"{s.skipped_identical} identical; prompt truncated in {s.prompt_truncated}; "
        f"prompt not a token prefix of prompt+completion in {s.prefix_mismatches}"
    )
