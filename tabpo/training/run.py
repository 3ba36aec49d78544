"""One training run's state and its optimizer step, evaluation and checkpoints.

A step consumes ``batch_size * gradient_accumulation_steps * W`` pairs of a seeded per-epoch
permutation (W processes, ``tabpo.training.parallel``), as micro-batches whose gradients are
scaled by their share of the step's pairs, so k accumulated micro-batches of B equal one
batch of kB, and W processes accumulating k each equal one accumulating kW.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.common.files import OutputDir, point, remove, sync_dir, write_dir
from tabpo.data.batching import PairBatch, batches, collate
from tabpo.data.encoding import EncodedPair, EncodeStats
from tabpo.losses import Objective
from tabpo.training import config as cfg
from tabpo.training import refcache
from tabpo.training.backend import Backend, StepResult
from tabpo.training.checkpoint import FINAL, TrainerState, checkpoints, write_state
from tabpo.training.parallel import FILLER, Parallel, Single, gathered, mine
from tabpo.training.schedule import learning_rate, warmup_steps
from tabpo.training.tracking import combine


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
    par: Parallel = field(default_factory=Single)

    @property
    def per_step(self) -> int:
        """Pairs per optimizer step, over all ranks (``--batch-size`` is per process)."""
        return self.c.batch_size * self.c.gradient_accumulation_steps * self.par.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train.pairs) / self.per_step)

    # -- one optimizer step ---------------------------------------------------------------

    def step(self) -> dict[str, float]:
        s = self.state
        chosen = step_pairs(len(self.train.pairs), self.per_step, self.c.seed, s.epoch,
                            s.epoch_step)  # fmt: skip
        size = self.c.batch_size
        micros = [chosen[start : start + size] for start in range(0, len(chosen), size)]
        parts: list[tuple[int, tuple[int, dict[str, float], int]]] = []
        for m, indices in mine(micros, self.par):  # this rank's micro-batches
            micro = [self.train.pairs[i] for i in indices]
            batch = collate(micro, self.pad)
            ref = self.ref_train.for_batch(batch) if self.ref_train else None
            scale = 0.0 if m == FILLER else len(micro) / len(chosen)
            result = self.backend.forward_backward(batch, self.objective, ref, scale=scale)
            self.check_finite(result, batch)
            if m == FILLER:
                continue
            parts.append((m, (len(micro), {"loss": result.loss, **result.metrics},
                              result.tokens)))  # fmt: skip
        lr = learning_rate(s.step, base=self.c.learning_rate, total=s.total_steps,
                           warmup=self.warmup, kind=self.c.lr_scheduler)  # fmt: skip
        grad_norm = self.backend.optimizer_step(lr, self.c.max_grad_norm)
        every = gathered(self.par, parts)  # every rank's micro-batches, in step order
        tokens = sum(t for _, _, t in every)
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
        metrics = combine((n, m) for n, m, _ in every)
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
        share = mine(list(batches(self.eval.pairs, self.c.eval_batch_size, pad_id=self.pad)),
                     self.par)  # fmt: skip
        self.callbacks.phase("eval", sum(len(batch.indices) for _, batch in share))
        for m, batch in share:
            ref = self.ref_eval.for_batch(batch) if self.ref_eval else None
            result = self.backend.evaluate(batch, self.objective, ref)
            if m != FILLER:
                parts.append((m, (len(batch.indices), {"loss": result.loss, **result.metrics})))
            self.callbacks.advance("eval", len(batch.indices))
        return {f"eval_{k}": v for k, v in combine(gathered(self.par, parts)).items()}

    def write_dir(self, target: Path, fill: Callable[[Path], None]) -> None:
        """``tabpo.common.files.write_dir`` with every rank filling the temporary directory
        rank 0 made (the backend decides what each rank writes); rank 0 renames it."""
        par = self.par
        if par.rank != 0:
            tmp = Path(par.gather(None)[0])
            fill(tmp)
            par.barrier()  # filled
        else:

            def together(tmp: Path) -> None:
                par.gather(str(tmp))
                fill(tmp)
                par.barrier()

            write_dir(target, together)
        par.barrier()  # renamed

    def checkpoint(self) -> Path:
        """``checkpoint-<step>``: weights, optimizer and RNG state, trainer state and config,
        written as one directory renamed into place; then at most ``save_total_limit``
        checkpoints are kept (the oldest go)."""
        target = self.output / f"checkpoint-{self.state.step}"

        def fill(tmp: Path) -> None:
            self.backend.save_weights(tmp)
            self.backend.save_state(tmp)
            if self.par.rank == 0:
                write_state(tmp, self.state, cfg.to_yaml(self.c))

        if self.par.rank == 0:
            OutputDir(self.output).record(target.name)
        self.write_dir(target, fill)
        self.callbacks.message(f"saved {target}")
        if self.c.save_total_limit and self.par.rank == 0:
            old = checkpoints(self.output)[: -self.c.save_total_limit]
            for path in old:
                remove(path)
            OutputDir(self.output).forget(*(p.name for p in old))
        self.par.barrier()
        return target

    def publish_final(self) -> None:
        """The final weights in ``final/``, reached from the top of the output directory
        (one link per file, so the directory loads as its stack's adapter or model).

        ``final`` is a link to ``.final-<step>``, written as one directory and swapped in
        one rename: whenever the process dies, the top-level files are one step's set."""
        name = f".final-{self.state.step}"
        files: list[str] = []

        def fill(tmp: Path) -> None:
            self.backend.save_weights(tmp)
            files.extend(sorted(p.name for p in tmp.iterdir()))

        out = OutputDir(self.output)
        if self.par.rank == 0:
            out.record(name, FINAL)  # listed before they exist: --force finds what a kill left
        self.write_dir(self.output / name, fill)
        if self.par.rank != 0:
            return
        out.record(*files)
        point(self.output / FINAL, name)
        for file in files:
            link = self.output / file
            if not link.is_symlink():
                remove(link)  # a real file left by an older tabpo: ours (it is listed)
                os.symlink(f"{FINAL}/{file}", link)
        for stale in self.output.glob(".final-*"):
            if stale.name != name:
                remove(stale)
                out.forget(stale.name)
        sync_dir(self.output)
