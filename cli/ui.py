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
from tabpo.train import Callbacks

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "it/s", "tok/s")


class RichCallbacks(Callbacks):
    """One progress bar per phase, the latest metrics beside it; Ctrl-C asks for a stop."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=console,
        )
        self.task: Any = None
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
        if self.task is not None:
            self.progress.update(self.task, visible=self.progress.tasks[-1].finished)
        self.task = self.progress.add_task(name, total=total, figures="")

    def advance(self, n: int = 1, figures: dict[str, float] | None = None) -> None:
        self.progress.advance(self.task, n)

    def log(self, record: dict[str, Any]) -> None:
        text = "  ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
        if "eval_loss" in record:
            console.print(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}")
        elif self.task is not None:
            self.progress.update(self.task, figures=text)

    def message(self, text: str) -> None:
        console.print(text, highlight=False)

    def should_stop(self) -> bool:
        return self.stop_requested
