"""Rich progress bars and live figures for long commands (the core reports, this draws)."""

from __future__ import annotations

import signal
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

from tabpo.cli.common import console
from tabpo.training.loop import Callbacks

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "it/s", "tok/s")


class RichCallbacks(Callbacks):
    """One progress bar per phase, the latest metrics beside it; Ctrl-C asks for a stop."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=console,
        )
        self.tasks: dict[str, Any] = {}
        self.stop_requested = False
        self._previous_handler: Any = None

    def __enter__(self) -> RichCallbacks:
        self.progress.start()
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous_handler)
        self.progress.stop()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # first Ctrl-C: finish the step, save, exit; a second one interrupts at once
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/]")

    def phase(self, name: str, total: int) -> None:
        """One bar per phase name; a phase that comes back (eval) restarts its own bar."""
        if name in self.tasks:
            self.progress.reset(self.tasks[name], total=total, visible=True)
        else:
            self.tasks[name] = self.progress.add_task(name, total=total, figures="")

    def advance(self, phase: str, n: int = 1) -> None:
        self.progress.advance(self.tasks[phase], n)

    def log(self, record: dict[str, Any]) -> None:
        if "eval_loss" in record:
            figures = "  ".join(f"{k} {record['eval_' + k]:.4g}" for k in SHOWN[:3]
                                if "eval_" + k in record)  # fmt: skip
            console.print(f"step {record['step']}: eval {figures}", highlight=False)
        elif "train" in self.tasks:
            text = "  ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
            self.progress.update(self.tasks["train"], figures=text)

    def message(self, text: str) -> None:
        console.print(text, highlight=False)

    def should_stop(self) -> bool:
        return self.stop_requested
