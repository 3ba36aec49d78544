"""A real `tabpo train` process killed with SIGKILL at seeded random moments while it writes
checkpoints: every time, the newest complete checkpoint loads and `--resume` from it gives
the losses of an uninterrupted run, each step logged once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_pairs

from tabpo.training.checkpoint import read_state, resolve_checkpoint

pytest.importorskip("torch")

STEPS = 8
TRIALS = 6
CLI = [sys.executable, "-c", "from tabpo.cli.app import main; main()", "train"]


def command(model: Path, data: Path, out: Path, cache: Path) -> list[str]:
    return [*CLI, "--backend", "torch", "--model", str(model), "--data", str(data),
            "--output", str(out), "--ref-cache-dir", str(cache), "--max-steps", str(STEPS),
            "--save-steps", "1", "--batch-size", "2", "--gradient-accumulation-steps", "1",
            "--lora-rank", "4", "--learning-rate", "1e-2"]  # fmt: skip


def wait_for(out: Path, prefix: str, proc: subprocess.Popen, limit: float = 120.0) -> None:
    """Poll until an entry of ``out`` starts with ``prefix`` (or the process ends)."""
    deadline = time.monotonic() + limit
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"no {prefix}* within {limit} s"
        try:
            if any(name.startswith(prefix) for name in os.listdir(out)):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.0005)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_during_checkpoint_writes_then_resume(tiny_model, tmp_path):
    model = tiny_model("llama")
    data = write_pairs(tmp_path / "train.jsonl", 8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(command(model, data, straight, tmp_path / "cache"), env=env, check=True,
                   capture_output=True)  # fmt: skip
    want = losses(straight)
    assert sorted(want) == list(range(1, STEPS + 1))
    rng = random.Random(1234)
    interrupted_writes = 0
    for trial in range(TRIALS):
        out = tmp_path / f"run-{trial}"
        proc = subprocess.Popen(command(model, data, out, tmp_path / "cache"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        # wait for the temporary directory of a checkpoint (or of the final weights) drawn at
        # random to appear, then kill at a random moment of its writing
        target = rng.choice([f"checkpoint-{k}" for k in range(2, STEPS + 1)] + [f".final-{STEPS}"])
        wait_for(out, f".{target}.tmp-", proc)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            continue  # it finished first: nothing was interrupted
        interrupted_writes += any(".tmp" in p.name for p in out.iterdir())
        checkpoint = resolve_checkpoint(out)
        assert read_state(checkpoint).step >= 1, f"trial {trial}: {checkpoint} is incomplete"
        result = subprocess.run([*command(model, data, out, tmp_path / "cache"), "--resume",
                                 str(out)], env=env, capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, f"trial {trial}: resume failed: {result.stderr[-2000:]}"
        got = losses(out)
        assert sorted(got) == sorted(want), f"trial {trial}: steps {sorted(got)}"
        worst = max(abs(got[s] - want[s]) for s in want)
        assert worst <= 1e-6, f"trial {trial}: resumed losses differ from straight by {worst:.2e}"
        assert (out / "adapter_model.safetensors").is_file()  # the final set, complete
        left = [p.name for p in out.iterdir() if ".tmp" in p.name or ".old-" in p.name]
        assert not left, f"trial {trial}: the killed run's temporaries are still there: {left}"
    assert interrupted_writes >= 2, f"{interrupted_writes} kills landed inside a write"
