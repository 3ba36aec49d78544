"""``tabpo build-model``: reproduce the shipped tiny SFT checkpoint, seeded."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from tabpo.cli.common import console, handles_errors, quiet_libraries

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")  # fmt: skip


@handles_errors
def build_model(
    out: Annotated[Path, typer.Option(help="Work directory: data/, init/, sft/.")],
    seed: Annotated[int, typer.Option(help="Seed of the data, the tokenizer and init.")] = 0,
    steps: Annotated[int | None, typer.Option(help="SFT steps (default: the recipe's).")] = None,
    install: Annotated[
        bool, typer.Option(help="Copy the result over the shipped checkpoint (models/tiny).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing work directory.")] = False,
) -> None:
    """Generate the benchmark, train a byte-level BPE tokenizer and initialise the tiny
    llama at random, then SFT it with `tabpo train --loss sft --finetune full` (the recipe
    in tabpo.models.tiny.SFT_RECIPE)."""
    from tabpo.backends import get_backend
    from tabpo.cli.ui import progress_callbacks
    from tabpo.clinical import write_splits
    from tabpo.common.files import OutputDir, write_dir
    from tabpo.models.tiny import SFT_RECIPE, SHIPPED, corpus, init_model
    from tabpo.training import config as cfg
    from tabpo.training.loop import train

    quiet_libraries()
    output = OutputDir(out)
    output.check(force=force, option="--out")
    if force:
        output.clear()
    output.record("data", "init", "sft", "cache")
    splits = write_splits(out / "data", seed=seed)
    console.print(f"benchmark: {', '.join(f'{k} {v}' for k, v in splits.items())}")
    init_model(out / "init", corpus(splits["sft"]), seed=seed)
    recipe = {**SFT_RECIPE, "seed": seed, **({"max_steps": steps} if steps else {})}
    c = cfg.build({}, {**recipe, "model": str(out / "init"), "data": str(splits["sft"]),
                       "eval_data": str(splits["dev"]), "output": str(out / "sft"),
                       "ref_cache_dir": str(out / "cache")})  # fmt: skip
    with progress_callbacks() as callbacks:
        train(c, get_backend(c.backend), callbacks)
    if install:
        write_dir(SHIPPED, lambda d: [shutil.copy2(out / "sft" / f, d / f) for f in MODEL_FILES
                                      if (out / "sft" / f).exists()])  # fmt: skip
        console.print(f"installed the checkpoint in {SHIPPED}")
    console.print(f"[green]done[/]: {out / 'sft'}")
