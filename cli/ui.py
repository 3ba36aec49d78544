"""Progress for long commands (the core reports through ``Callbacks``, this draws).

Progress goes to stderr, so stdout holds only results (a table, a JSON document). In a
terminal: one Rich progress row per phase (name, bar, done/total, rate, elapsed,
remaining), the latest metrics on a line of their own below, so a narrow window never
squeezes the counts out. Anywhere else (a log file, CI): plain lines, a phase's progress at
most every ``PLAIN_EVERY`` seconds and at its end, and every logged training step, as
TRL's logging steps print. Ctrl-C asks the loop to stop after the current step.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tabpo.cli.common import console, err_console
from tabpo.training.loop import Callbacks

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate", "it/s",
         "tok/s")  # fmt: skip
PLAIN_EVERY = 30.0  # seconds between two plain progress lines of one phase


def progress_callbacks() -> Callbacks:
    """Rich progress in a terminal, plain periodic lines anywhere else."""
    return RichCallbacks() if err_console.is_terminal else PlainCallbacks()


def figures(record: dict[str, Any], prefix: str = "") -> str:
    return "  ".join(f"{k} {record[prefix + k]:.4g}" for k in SHOWN if prefix + k in record)


class Interruptible(Callbacks):
    """The first Ctrl-C asks for a stop after the current step (which saves); a second one
    interrupts at once. Use as a context manager around the long work."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._previous_handler: Any = None

    def __enter__(self) -> Interruptible:
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous_handler)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/]")

    def should_stop(self) -> bool:
        return self.stop_requested

    def message(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)


class _Progress(Progress):
    """Progress rows, then the latest metrics on their own line."""

    figures = ""

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        if self.figures:
            yield Text(self.figures, overflow="fold")


class RichCallbacks(Interruptible):
    """One progress row per phase; a phase that comes back (eval) restarts its own row."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = _Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichCallbacks:
        super().__enter__()
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        super().__exit__(*exc)

    def phase(self, name: str, total: int) -> None:
        if name in self.tasks:
            self.progress.reset(self.tasks[name], total=total, visible=True, rate="")
        else:
            self.tasks[name] = self.progress.add_task(name, total=total, rate="")

    def advance(self, phase: str, n: int = 1) -> None:
        task = self.tasks[phase]
        self.progress.advance(task, n)
        speed = self.progress.tasks[task].speed
        self.progress.update(task, rate=f"{speed:.2f}/s" if speed else "")

    def log(self, record: dict[str, Any]) -> None:
        if "eval_loss" in record:
            err_console.print(f"step {record['step']}: eval {figures(record, 'eval_')}",
                          highlight=False, soft_wrap=True)  # fmt: skip
        else:
            self.progress.figures = f"step {record['step']}: {figures(record)}"
            self.progress.refresh()


class PlainCallbacks(Interruptible):
    """Plain lines for logs: each phase's progress now and then, every logged step."""

    def __init__(self, every: float = PLAIN_EVERY) -> None:
        super().__init__()
        self.every = every
        self.phases: dict[str, dict[str, float]] = {}

    def phase(self, name: str, total: int) -> None:
        now = time.perf_counter()
        self.phases[name] = {"total": total, "done": 0, "start": now, "said": now}
        err_console.print(f"{name}: 0/{total}", highlight=False, soft_wrap=True)

    def advance(self, phase: str, n: int = 1) -> None:
        p = self.phases[phase]
        p["done"] += n
        now = time.perf_counter()
        if p["done"] >= p["total"] or now - p["said"] >= self.every:
            p["said"] = now
            err_console.print(f"{phase}: {self._status(p, now)}", highlight=False, soft_wrap=True)

    def _status(self, p: dict[str, float], now: float) -> str:
        done, total, spent = int(p["done"]), int(p["total"]), now - p["start"]
        rate = done / spent if spent > 0 else 0.0
        return (f"{done}/{total} ({100 * done / max(total, 1):.0f}%), {rate:.2f}/s, "
                f"elapsed {_clock(spent)}, eta {_clock(self._eta(p))}")  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        if "eval_loss" in record:
            err_console.print(f"step {record['step']}: eval {figures(record, 'eval_')}",
                          highlight=False, soft_wrap=True)  # fmt: skip
            return
        train = self.phases.get("train")  # its total counts the steps this process runs
        where = f"step {record['step']}"
        if train is not None:
            last = record["step"] + int(train["total"] - train["done"])
            where = f"step {where[5:]}/{last}, eta {_clock(self._eta(train))}"
        err_console.print(f"{where}: {figures(record)}", highlight=False, soft_wrap=True)

    @staticmethod
    def _eta(p: dict[str, float]) -> float:
        spent = time.perf_counter() - p["start"]
        return (p["total"] - p["done"]) * spent / p["done"] if p["done"] else float("nan")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: not known yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )
