"""Progress a user can read: in a 120-column terminal the counts, rate and ETA stay in view
with the metrics on their own line; in a log (not a terminal) plain periodic lines."""

from __future__ import annotations

import io

from helpers import write_pairs
from rich.console import Console, Group
from typer.testing import CliRunner

from tabpo.cli import ui
from tabpo.cli.app import app

RECORD = {"step": 3, "loss": 0.6931, "rewards/accuracies": 0.5, "rewards/margins": 0.0123,
          "grad_norm": 1.234, "learning_rate": 2e-4, "it/s": 1.25, "tok/s": 912.0}  # fmt: skip


def test_terminal_rows_keep_count_rate_and_eta_beside_metrics(monkeypatch):
    screen = Console(width=120, force_terminal=True, record=True, file=io.StringIO())
    monkeypatch.setattr(ui, "err_console", screen)
    callbacks = ui.RichCallbacks()
    callbacks.phase("train", 300)
    for _ in range(3):
        callbacks.advance("train")
    callbacks.log(RECORD)
    screen.print(Group(*callbacks.progress.get_renderables()))
    lines = [line for line in screen.export_text().splitlines() if line.strip()]
    row = next(line for line in lines if line.lstrip().startswith("train"))
    assert "3/300" in row and "eta" in row and "/s" in row, row
    metrics = next(line for line in lines if "loss 0.6931" in line)
    assert metrics != row and "it/s 1.25" in metrics  # their own line, the row untouched
    assert max(len(line) for line in lines) <= 120


def test_a_log_gets_plain_lines(tiny_model, tmp_path):
    """CliRunner's output is not a terminal: the phase's start and end, and every logged
    step with its total and ETA, on stderr (stdout holds only results)."""
    data = write_pairs(tmp_path / "d.jsonl", 4)
    result = CliRunner().invoke(app, [str(a) for a in (
        "train", "--backend", "torch", "--model", tiny_model(), "--data", data, "--output",
        tmp_path / "out", "--max-steps", 3, "--batch-size", 2, "--lora-rank", 4,
        "--ref-cache-dir", tmp_path / "cache")])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "train: 0/3" in lines and any(x.startswith("train: 3/3 (100%)") for x in lines)
    for step in (1, 2, 3):
        assert any(x.startswith(f"step {step}/3, eta ") and "loss " in x for x in lines), lines


def test_plain_phase_lines_are_periodic():
    out = io.StringIO()
    ui.err_console.file = out  # the module's console, as the commands use it
    try:
        callbacks = ui.PlainCallbacks(every=3600.0)
        callbacks.phase("decoding", 10)
        for _ in range(10):
            callbacks.advance("decoding")
    finally:
        ui.err_console.file = None
    lines = out.getvalue().splitlines()
    assert lines[0] == "decoding: 0/10" and lines[-1].startswith("decoding: 10/10 (100%)")
    assert len(lines) == 2  # nothing in between within the period
