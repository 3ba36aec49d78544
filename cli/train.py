"""``tabpo train``: the options are the fields of ``tabpo.training.config.TrainConfig``.

The command's signature is built from the dataclass, so every option has one definition:
its name, type, default and help (shown in groups), the same as the YAML key.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from tabpo.cli.common import console, handles_errors, launched_rank, quiet_libraries
from tabpo.training import config as cfg
from tabpo.training import names
from tabpo.training.checkpoint import CONFIG_FILE, resolve_checkpoint

GROUPS = ("Model", "Data", "Loss", "LoRA", "Optimizer", "Output")
INTERRUPTED = 130  # the shell's exit status after SIGINT: a stopped run is not a finished one


def _group(name: str) -> str:
    return str(cfg.FIELDS[name].metadata["group"])


def _option(name: str) -> inspect.Parameter:
    field = cfg.FIELDS[name]
    hint = typing.get_type_hints(cfg.TrainConfig)[name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    default = field.default
    shown = "" if default is None else f" (default: {default})"
    flags = ["--" + name.replace("_", "-"), *names.FLAGS.get(name, ())]  # + mlx-lm's spellings
    decls = [f"{f}/--no-{f[2:]}" for f in flags] if base is bool and name != "force" else flags
    option = typer.Option(*decls, help=field.metadata["help"] + shown,
                          rich_help_panel=field.metadata["group"], show_default=False)  # fmt: skip
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[base | None, option],
    )  # fmt: skip


def train(**values: Any) -> None:
    """Train a model with TAB-PO or any loss of the library (see the README).

    Every option can also come from --config FILE.yaml (keys are the option names); a flag
    given here overrides the file.
    """
    _run(values)


@handles_errors
def _run(values: dict[str, Any]) -> None:
    from tabpo.backends import get_backend
    from tabpo.cli.ui import progress_callbacks
    from tabpo.training.loop import check
    from tabpo.training.loop import train as run_training

    config_file = values.pop("config", None)
    file_values: dict[str, Any] = {}
    if values.get("resume"):  # the checkpoint's own config, under the file and the flags
        checkpoint = resolve_checkpoint(values["resume"])
        file_values = cfg.read_yaml(checkpoint / CONFIG_FILE)
        file_values.setdefault("output", str(checkpoint.parent))
    if config_file is not None:
        file_values.update(cfg.read_yaml(config_file))
    c = cfg.build(file_values, values)
    plan = check(c)  # the options, output and data files, before any backend is imported
    quiet_libraries()
    backend = get_backend(c.backend)
    lead = launched_rank() in (None, 0)  # under a launcher, rank 0 alone prints
    if lead:
        console.print(f"tabpo train: {c.loss} on {c.model} with the {backend.name} backend "
                      f"({c.finetune}, {c.dtype}) -> {c.output}")  # fmt: skip
    with progress_callbacks() as callbacks:
        run = run_training(c, backend, callbacks, plan)
    if run.state.step < run.state.total_steps:  # stopped by Ctrl-C: saved, and said so once
        raise typer.Exit(INTERRUPTED)
    if lead:
        world = backend.parallel().world_size
        on = f" on {world} processes" if world > 1 else ""
        console.print(f"[green]done[/]: {run.state.step} steps{on}, weights in {c.output}")


_params = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option(
                "--config",
                "-c",
                help="YAML file of options (keys are the option names).",
                rich_help_panel="Model",
            ),
        ],
    )  # fmt: skip
] + sorted((_option(name) for name in cfg.FIELDS), key=lambda p: GROUPS.index(_group(p.name)))
train.__signature__ = inspect.Signature(_params)  # type: ignore[attr-defined]
