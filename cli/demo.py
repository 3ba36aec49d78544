"""``tabpo demo``: the embedded benchmark, end to end, offline."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tabpo.cli.common import console, handles_errors, quiet_libraries

USER_MODEL = "A user's model (--model)"
SIZES = "Sizes and budget"


def _lora(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel=USER_MODEL)


def _size(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel=SIZES)


@handles_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output directory (data, runs, report).")] = Path(
        "tabpo-demo"
    ),
    backend: Annotated[str, typer.Option(help="mlx, torch or auto.")] = "auto",
    seeds: Annotated[int, typer.Option(help="Seeds per method (intervals over seeds).")] = 1,
    quick: Annotated[bool, typer.Option(help="A smaller run (~2 minutes) to try it out.")] = False,
    full: Annotated[
        bool, typer.Option(help="All baselines (DPO, IPO, SimPO, Cal-DPO, DPOP), 3 seeds.")
    ] = False,
    model: Annotated[
        Path | None,
        typer.Option(
            help="A pretrained Hugging Face model directory: LoRA SFT on the benchmark's SFT "
            "split first, the adapter merged, then every method as LoRA on the merged SFT "
            "model (its reference). Default: the shipped tiny SFT model, full fine-tuning."
        ),
    ] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated losses to train.")] = None,
    eval_split: Annotated[
        str, typer.Option(help="test, or dev to choose hyperparameters.")
    ] = "test",
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    steps: Annotated[
        int | None, _size("Training steps per method (default 300; --quick 40).")
    ] = None,
    learning_rate: Annotated[
        float | None,
        _size("The methods' learning rate (default 2e-5 full fine-tuning, 1e-4 with --model)."),
    ] = None,
    batch_size: Annotated[int, _size("Pairs (SFT: examples) per step.")] = 8,
    pref_size: Annotated[
        int | None,
        _size("Preference-split messages the pairs come from (default 1000; --quick 200)."),
    ] = None,
    test_size: Annotated[
        int | None, _size("Test messages evaluated (default 300; --quick 100).")
    ] = None,
    max_new_tokens: Annotated[int, _size("Longest answer decoded, in tokens.")] = 160,
    dtype: Annotated[str, _size("float32, bfloat16 or float16.")] = "float32",
    gradient_checkpointing: Annotated[
        bool, _size("Recompute each decoder layer in the backward (less memory).")
    ] = False,
    sft_steps: Annotated[int | None, _lora("LoRA SFT steps (default 200; --quick 50).")] = None,
    sft_size: Annotated[
        int | None, _lora("SFT-split messages (default 2000; --quick 500).")
    ] = None,
    sft_learning_rate: Annotated[
        float | None, _lora("LoRA SFT learning rate (default 2e-4).")
    ] = None,
    lora_rank: Annotated[
        int | None, _lora("LoRA rank of SFT and every method (alpha = 2 x rank; default 16).")
    ] = None,
) -> None:
    """Get an SFT model (the shipped tiny one, or LoRA SFT of --model), build pairs from its
    confusions, train DPO and TAB-PO (--full: every baseline) under the same budget, evaluate
    them all on held-out test phrasings, and write report.md (each metric with its 95%
    interval, TAB-PO's paired differences), results.json and figure.png."""
    from tabpo.backends import get_backend, resolve
    from tabpo.cli.ui import progress_callbacks
    from tabpo.clinical import report
    from tabpo.clinical.demo import (
        FULL_METHODS,
        LORA_LEARNING_RATE,
        OUTPUTS,
        DemoSettings,
        run_demo,
    )
    from tabpo.common.errors import TabpoError
    from tabpo.common.files import OutputDir
    from tabpo.models.merge import merge
    from tabpo.models.tiny import SHIPPED

    quiet_libraries()
    output = OutputDir(out)
    output.check(force=force, option="--out")
    lora = {"--sft-steps": sft_steps, "--sft-size": sft_size,
            "--sft-learning-rate": sft_learning_rate, "--lora-rank": lora_rank}  # fmt: skip
    if model is None:
        given = [flag for flag, value in lora.items() if value is not None]
        if given:
            raise TabpoError(f"{', '.join(given)}: only with --model (the LoRA path)")
        if not (SHIPPED / "config.json").is_file():
            raise TabpoError(f"no SFT model at {SHIPPED}: run `tabpo build-model --install` first")
    elif not (model / "config.json").is_file():
        raise TabpoError(f"--model {model}: no config.json there (a Hugging Face model directory)")
    s = DemoSettings(out=out, model=model or SHIPPED, backend=resolve(backend), seeds=seeds,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype,
                     gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    if model is not None:
        s.finetune, s.learning_rate = "lora", LORA_LEARNING_RATE
    if full:
        s.methods, s.seeds = FULL_METHODS, max(seeds, 3)
    if quick:
        s.pref_size, s.test_size, s.steps, s.sft_size, s.sft_steps = 200, 100, 40, 500, 50
    chosen = {"steps": steps, "learning_rate": learning_rate, "pref_size": pref_size,
              "test_size": test_size, "sft_steps": sft_steps, "sft_size": sft_size,
              "sft_learning_rate": sft_learning_rate, "lora_rank": lora_rank}  # fmt: skip
    for key, value in chosen.items():
        if value is not None:
            setattr(s, key, value)
    if methods is not None:
        s.methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    if eval_split not in ("test", "dev"):
        raise TabpoError("--eval-split must be test or dev")
    s.eval_split = eval_split
    if force:
        output.clear()
    output.record(*OUTPUTS)

    def merge_sft(adapter: Path, base: Path, dst: Path) -> None:
        # not verified (two more loads of the model): the merge's own tests cover it
        merge(adapter, dst, base=base, to=s.backend, force=True, verify_result=False)

    started = time.perf_counter()
    with progress_callbacks() as callbacks:
        result = run_demo(s, get_backend, callbacks, merge=merge_sft)
    path = report.write(result, out, "tabpo " + " ".join(sys.argv[1:]))
    show(report.estimate(result))
    console.print(f"[green]report[/]: {path}  figure: {out / 'figure.png'}  "
                  f"(demo took {time.perf_counter() - started:.0f} s)")  # fmt: skip


def show(e: Any) -> None:
    """report.md's tables and sentences for the terminal, on the six main metrics: each
    cell the mean over its interval, a difference green / red where it excludes 0."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from tabpo.clinical.report import FOCUS, LABELS, MAIN, PREVIEW, name, preview, verdicts

    keys = [k for k in MAIN if k in e.metrics]

    def two_lines(i: Any, signed: bool) -> Text:
        f = "{:+.3f}" if signed else "{:.3f}"
        style = "" if not (signed and i.resolved) else "green" if i.value > 0 else "red"
        return Text(f"{f.format(i.value)}\n{f.format(i.low)}–{f.format(i.high)}", style=style)

    titles = {
        False: "each metric, mean over its 95% interval",
        True: f"{name(FOCUS)} minus each model, paired (green / red: excludes 0)",
    }
    for signed, rows in ((False, e.models), (True, e.differences)):
        if not rows:
            continue
        table = Table(title=titles[signed])
        table.add_column(f"{name(FOCUS)} −" if signed else "model")
        for k in keys:
            table.add_column(LABELS[k], justify="right")
        for model, found in rows.items():
            table.add_row(name(model), *(two_lines(found[k], signed) for k in keys))
        console.print(table)
    for line in verdicts(e, keys):
        console.print(line, markup=False, highlight=False)
    if preview(e):
        console.print(f"[bold yellow]{PREVIEW}[/] {escape(preview(e))}")
