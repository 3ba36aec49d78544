"""``tabpo build-model``: reproduce the shipped tiny SFT checkpoint, seeded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from tabpo.cli.common import console, handles_errors, quiet_libraries

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")  # fmt: skip


@handles_errors
def build_model(
    out: Annotated[Path, typer.Option(help="Work directory: data/, init/, copy/, sft/, fresh/.")],
    seed: Annotated[int, typer.Option(help="Seed of the data, the tokenizer and init.")] = 0,
    steps: Annotated[int | None, typer.Option(help="SFT steps (default: the recipe's).")] = None,
    copy_steps: Annotated[
        int | None, typer.Option(help="Copying warm-up steps (default: the recipe's).")
    ] = None,
    fresh_steps: Annotated[
        int | None, typer.Option(help="Fresh-message SFT steps (default: the recipe's).")
    ] = None,
    install: Annotated[
        bool, typer.Option(help="Copy the result over the shipped checkpoint (models/tiny).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing work directory.")] = False,
) -> None:
    """Generate the benchmark, train a byte-level BPE tokenizer and initialise the tiny
    llama at random, train it to copy (COPY_RECIPE, on the copying warm-up), then SFT it
    (SFT_RECIPE, on the SFT split with REPLAY_SIZE copying records mixed in), then SFT it
    again on FRESH_SIZE messages of the SFT split's stream it has not seen (FRESH_RECIPE,
    with 2 x REPLAY_SIZE fresh copying records), each with `tabpo train --loss sft --finetune
    full` (tabpo.models.tiny)."""
    from tabpo.backends import get_backend
    from tabpo.cli.ui import progress_callbacks
    from tabpo.clinical import write_splits
    from tabpo.clinical.generator import copy_pieces, copy_split, generate_split
    from tabpo.common.files import OutputDir, write_dir, write_jsonl
    from tabpo.data.encoding import load_tokenizer
    from tabpo.models.tiny import (
        COPY_RECIPE,
        COPY_SIZE,
        FRESH_RECIPE,
        FRESH_SIZE,
        REPLAY_SIZE,
        SFT_RECIPE,
        SHIPPED,
        corpus,
        init_model,
    )
    from tabpo.training import config as cfg
    from tabpo.training.loop import train

    quiet_libraries()
    output = OutputDir(out)
    output.check(force=force, option="--out")
    if force:
        output.clear()
    output.record("data", "init", "copy", "sft", "fresh", "cache")
    splits = write_splits(out / "data", seed=seed)
    tokenizer = load_tokenizer(init_model(out / "init", corpus(splits["sft"]), seed=seed))
    pieces = copy_pieces(
        tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))
    )
    warmup = write_jsonl(copy_split(COPY_SIZE, pieces, seed), out / "data" / "copy.jsonl")
    replay = copy_split(REPLAY_SIZE, pieces, seed, stream="replay")
    sft = [json.loads(line) for line in splits["sft"].read_text().splitlines()]
    mixed = write_jsonl(sft + replay, out / "data" / "sft-replay.jsonl")
    # The SFT split's stream continued: its first len(sft) messages are the SFT split's.
    fresh = generate_split("sft", len(sft) + FRESH_SIZE, seed)[len(sft) :]
    rehearsal = copy_split(2 * REPLAY_SIZE, pieces, seed, stream="replay2")
    fresh_mixed = write_jsonl(fresh + rehearsal, out / "data" / "fresh-replay.jsonl")
    console.print(
        f"benchmark: {', '.join(f'{k} {v}' for k, v in splits.items())}, "
        f"copying warm-up {warmup}, SFT stage (+{REPLAY_SIZE} replayed) {mixed}, "
        f"fresh SFT stage (+{2 * REPLAY_SIZE} replayed) {fresh_mixed}"
    )
    stages = [("init", "copy", warmup, None, COPY_RECIPE, copy_steps),
              ("copy", "sft", mixed, splits["dev"], SFT_RECIPE, steps),
              ("sft", "fresh", fresh_mixed, None, FRESH_RECIPE, fresh_steps)]  # fmt: skip
    for start, stage, data, eval_data, recipe, max_steps in stages:
        console.print(f"stage {stage}: from {out / start}")
        chosen = {"seed": seed, **({"max_steps": max_steps} if max_steps else {})}
        paths = {
            "model": out / start,
            "data": data,
            "output": out / stage,
            "ref_cache_dir": out / "cache",
            **({"eval_data": eval_data} if eval_data else {}),
        }
        c = cfg.build({}, {**recipe, **chosen, **{k: str(v) for k, v in paths.items()}})
        with progress_callbacks() as callbacks:
            train(c, get_backend(c.backend), callbacks)
    if install:
        write_dir(SHIPPED, lambda d: [shutil.copy2(out / "fresh" / f, d / f) for f in MODEL_FILES
                                      if (out / "fresh" / f).exists()])  # fmt: skip
        console.print(f"installed the checkpoint in {SHIPPED}")
    console.print(f"[green]done[/]: {out / 'fresh'}")
