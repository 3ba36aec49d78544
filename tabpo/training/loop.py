"""The training loop, written once for every backend.

Everything a backend does not have to know (data order, schedule, accumulation, reference
cache, evaluation, logging, checkpoints, stopping) lives here and in ``tabpo.training.run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabpo.common.errors import TabpoError
from tabpo.common.files import OutputDir, write_text
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
from tabpo.data.records import PreferenceExample, read_preferences
from tabpo.losses import get
from tabpo.models.families import inspect_model_dir
from tabpo.training import config as cfg
from tabpo.training import refcache
from tabpo.training.backend import Backend, ModelOptions, OptimizerSettings, seeded_lora_init
from tabpo.training.checkpoint import CONFIG_FILE, TrainerState, read_state, resolve_checkpoint
from tabpo.training.parallel import FILLER, Parallel, mine
from tabpo.training.run import Callbacks, Dataset, NonFiniteLoss, Run, step_pairs
from tabpo.training.tracking import (
    METRICS_FILE,
    OUTPUTS,
    MetricsLog,
    Reporter,
    Throughput,
    check_reporters,
    open_reporters,
    peak_rss_gb,
)

__all__ = ["Callbacks", "Dataset", "NonFiniteLoss", "Plan", "Run", "check", "step_pairs", "train"]


# -- setting up and running ---------------------------------------------------------------


@dataclass
class Plan:
    """What ``check`` found before anything heavy ran: where the output goes (and, on
    resume, the checkpoint and its state) and the data files, read and checked."""

    output: Path
    resumed: TrainerState | None
    checkpoint: Path | None
    train_examples: list[PreferenceExample]
    eval_examples: list[PreferenceExample] | None


def check(c: cfg.TrainConfig) -> Plan:
    """Everything that needs no model, tokenizer or backend, in a fraction of a second: the
    options, the output directory (or the checkpoint to resume from), the model
    directories, and every line of the data files. The CLI runs it before importing a
    backend, so a typo costs no model load."""
    cfg.validate(c)
    check_reporters(c.reporters())
    output, resumed, checkpoint = prepare_output(c)
    for path in filter(None, (c.model, c.ref_model)):
        window = inspect_model_dir(path).sliding_window
        if window is not None and window < c.max_length:
            raise TabpoError(
                f"{path}: sliding-window attention with a window of {window} tokens, shorter "
                f"than --max-length {c.max_length}: mlx-lm ignores the window (and so does "
                f"the shared-prefix forward), so the stacks would train different functions; "
                f"use --max-length {window} or less"
            )
    train_examples = read_examples(c.data or "", c)
    eval_examples = read_examples(c.eval_data, c) if c.eval_data else None
    return Plan(output, resumed, checkpoint, train_examples, eval_examples)


def read_examples(path: str, c: cfg.TrainConfig) -> list[PreferenceExample]:
    """The records of a data file, all pairs or all prompt/completion, as the loss needs."""
    examples, _ = read_preferences(path)
    kinds = {e.rejected is None for e in examples}
    if len(kinds) > 1:
        raise TabpoError(f"{path}: mixes preference pairs and prompt/completion records")
    if True in kinds and get(c.loss).needs_pairs:
        raise TabpoError(
            f"{path} holds prompt/completion records, but loss '{c.loss}' needs chosen and "
            f"rejected pairs (use --loss sft, or build pairs with tabpo pairs)"
        )
    return examples


def encode_dataset(
    path: str, examples: list[PreferenceExample], tokenizer: Any, c: cfg.TrainConfig
) -> Dataset:
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
    return Dataset(pairs, stats, path, {p.index: p.line for p in pairs})


def prepare_output(c: cfg.TrainConfig) -> tuple[Path, TrainerState | None, Path | None]:
    """The output directory (refused if it exists unless --force or --resume) and, on resume,
    the checkpoint's trainer state."""
    output = Path(c.output or "")
    if c.resume:
        checkpoint = resolve_checkpoint(c.resume)
        return output, read_state(checkpoint), checkpoint
    OutputDir(output).check(force=c.force, also=" or --resume")
    return output, None, None


def reference_table(run: Run, data: Dataset, *, name: str) -> refcache.RefTable:
    """Reference log-probs of every pair of ``data``: the cache's entries for the pairs it
    has (keyed by content), computed once for the others and added to it."""
    c = run.c
    weights = refcache.weights_digest(c.ref_model or c.model or "")
    key = refcache.model_key(weights, backend=run.backend.name, dtype=c.dtype)
    store = refcache.Store(Path(c.ref_cache_dir or refcache.default_cache_dir()) / key, key)
    entries = store.lookup(data.pairs)
    missing = [p for p in data.pairs if p.index not in entries]
    if missing:  # every rank computes its batches; all gather them; rank 0 writes the cache
        size = c.eval_batch_size
        share = mine([missing[i : i + size] for i in range(0, len(missing), size)], run.par)
        run.callbacks.phase(f"reference ({name})", sum(len(chunk) for _, chunk in share))
        # full fine-tuning without --ref-model: the reference is the policy before any step
        # (tabpo.training.reference), so it is asked for the policy's own log-probs
        separate = c.finetune == "lora" or c.ref_model is not None
        computed: dict[int, refcache.Entry] = {}
        for m, chunk in share:
            table = refcache.compute(
                lambda b: run.backend.logps(b, reference=separate),
                chunk,
                batch_size=size,
                pad_id=run.pad,
                progress=lambda n: run.callbacks.advance(f"reference ({name})", n),
            )
            if m != FILLER:
                computed.update(table.entries)
        for part in run.par.gather(computed):
            entries.update(part)
        if run.par.rank == 0:
            store.add(missing, refcache.RefTable(entries))
        run.par.barrier()
    run.callbacks.message(f"reference log-probs of {name}: {len(data.pairs) - len(missing)} "
                          f"cached, {len(missing)} computed ({store.directory})")  # fmt: skip
    return refcache.RefTable(entries)


def train(
    c: cfg.TrainConfig, backend: Backend, callbacks: Callbacks | None = None,
    plan: Plan | None = None,
) -> Run:  # fmt: skip
    """Run the whole training job described by ``c``; returns the finished run. ``plan``:
    what ``check(c)`` returned, when the caller ran it first."""
    plan = plan or check(c)  # every rank checks before any of them writes
    par = backend.parallel()
    par.barrier()  # every rank has checked the options and files; only now does rank 0 write
    callbacks = (callbacks or Callbacks()) if par.rank == 0 else Callbacks()  # one reporter
    output, resumed, checkpoint = plan.output, plan.resumed, plan.checkpoint
    if resumed is not None and resumed.world_size != par.world_size:
        raise TabpoError(
            f"--resume: {checkpoint} was trained by {resumed.world_size} process(es) and this "
            f"run has {par.world_size}: a step's pairs depend on the number of processes, "
            f"so resume with {resumed.world_size}"
        )
    tokenizer = load_tokenizer(c.model or "")
    train_data = encode_dataset(c.data or "", plan.train_examples, tokenizer, c)
    eval_data = None
    if c.eval_data and plan.eval_examples is not None:
        eval_data = encode_dataset(c.eval_data, plan.eval_examples, tokenizer, c)
    _report_encoding(callbacks, train_data)
    precompute = cfg.use_precomputed_reference(c)
    objective = get(c.loss).bind(**c.loss_hparams())
    backend.seed(c.seed)
    backend.load(
        ModelOptions(
            path=c.model or "",
            dtype=c.dtype,
            finetune=c.finetune,
            lora=c.lora(),
            device=c.device,
            ref_path=c.ref_model,
            keep_reference=objective.needs_reference and not precompute,
            prefix_sharing=c.prefix_sharing,
            gradient_checkpointing=c.gradient_checkpointing,
        )
    )
    if c.finetune == "lora":  # the same start on every backend, whatever its own init
        backend.load_trainable_state(seeded_lora_init(backend.trainable_state(), c.seed))
    run = Run(c, backend, objective, train_data, eval_data, pad_id(tokenizer), output, callbacks,
              par=par)  # fmt: skip
    run.state.world_size = par.world_size
    if precompute:  # before any resume: for full fine-tuning the reference is the start
        run.ref_train = reference_table(run, train_data, name="train")
        if eval_data:
            run.ref_eval = reference_table(run, eval_data, name="eval")
        backend.drop_reference()  # a --ref-model is not needed again
    backend.setup_optimizer(OptimizerSettings(weight_decay=c.weight_decay))
    if checkpoint is not None and resumed is not None:
        backend.load_state(checkpoint)
        run.state = resumed
        if par.rank == 0:
            MetricsLog(output / METRICS_FILE).truncate(resumed.step)
        callbacks.message(f"resumed from {checkpoint} at step {resumed.step}")
    total = c.max_steps or math.ceil(c.epochs * run.steps_per_epoch)
    run.state.total_steps = total
    reporters = _open_output(c, output, par)
    try:
        _loop(run, reporters)
    finally:
        for reporter in reporters:
            reporter.close()
    return run


def _open_output(c: cfg.TrainConfig, output: Path, par: Parallel) -> list[Reporter]:
    """Rank 0 prepares the output directory and opens the loggers; the others wait."""
    reporters: list[Reporter] = []
    if par.rank == 0:
        out = OutputDir(output)
        if c.force:  # only now: a run that failed to start loses nothing
            out.clear()
        out.clean_stale()
        out.record(CONFIG_FILE, METRICS_FILE, *(OUTPUTS[r] for r in c.reporters()))
        write_text(output / CONFIG_FILE, cfg.to_yaml(c))
        reporters = open_reporters(c.reporters(), output, c.to_dict())
    par.barrier()
    return reporters


class _Silent(MetricsLog):
    """The metrics log of a rank other than 0: the records are rank 0's to write."""

    def write(self, record: dict[str, Any]) -> None:
        pass


def _loop(run: Run, reporters: list[Reporter]) -> None:
    c, s = run.c, run.state
    log_type = MetricsLog if run.par.rank == 0 else _Silent
    log = log_type(run.output / METRICS_FILE, reporters)
    speed = Throughput()
    run.callbacks.phase("train", s.total_steps - s.step)
    last_saved = s.step
    while s.step < s.total_steps:
        record = run.step()
        speed.add(int(record.pop("_tokens")), run.par.comm_seconds())
        run.callbacks.advance("train")
        if s.step % c.logging_steps == 0 or s.step == s.total_steps:
            record = {"step": s.step, "epoch": round(s.epoch + s.epoch_step / max(
                run.steps_per_epoch, 1), 4), **record, **speed.read(),
                **memory(run.backend)}  # fmt: skip
            log.write(record)
            run.callbacks.log(record)
        if run.eval and c.eval_steps and s.step % c.eval_steps == 0 and s.step < s.total_steps:
            _log_eval(run, log)
        if c.save_steps and s.step % c.save_steps == 0 and s.step < s.total_steps:
            run.checkpoint()
            last_saved = s.step
        if any(run.par.gather(run.callbacks.should_stop())):  # rank 0's Ctrl-C stops all
            if s.step != last_saved:
                run.checkpoint()
            run.callbacks.message(f"stopped at step {s.step}; resume with --resume")
            return
    if run.eval:
        _log_eval(run, log)
    run.checkpoint()
    run.publish_final()


def memory(backend: Backend) -> dict[str, float]:
    """``peak_rss_gb``, the process's peak resident set, the same quantity whatever the
    backend; ``peak_accelerator_gb`` where the backend runs on a GPU."""
    out = {"peak_rss_gb": peak_rss_gb()}
    accelerator = backend.peak_accelerator_memory_gb()
    if accelerator is not None:
        out["peak_accelerator_gb"] = accelerator
    return out


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
