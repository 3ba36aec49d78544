"""Checkpoints: written to a temporary directory and renamed into place, never half-written.

A checkpoint directory holds what the backend writes (the adapter in its stack's format, or
a full model directory, plus optimizer and RNG state), ``trainer_state.json`` (step, epoch,
data position, trained tokens) and the resolved ``config.yaml``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tabpo.common.errors import TabpoError
from tabpo.common.files import STATE_FILE

CONFIG_FILE = "config.yaml"
FINAL = "final"  # the final weights: a link to the directory that holds them
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epoch of the next step
    epoch_step: int = 0  # position of the next step inside its epoch
    num_tokens: int = 0  # non-padding tokens trained on so far
    total_steps: int = 0
    world_size: int = 1  # processes that trained it: a step's pairs depend on it


def write_state(directory: Path, state: TrainerState, config_yaml: str) -> None:
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    (directory / CONFIG_FILE).write_text(config_yaml)


def read_state(directory: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((directory / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise TabpoError(f"{directory / STATE_FILE}: not a tabpo checkpoint ({exc})") from None


def checkpoints(output: Path) -> list[Path]:
    """The complete ``checkpoint-N`` directories of an output directory, oldest first."""
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest ``checkpoint-N`` inside an output dir."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise TabpoError(f"--resume: {path} does not exist")
    found = checkpoints(path)
    if not found:
        raise TabpoError(f"--resume: {path} holds no checkpoint (no {STATE_FILE})")
    return found[-1]
