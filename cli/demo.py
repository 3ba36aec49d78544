"""``tabpo demo``: the embedded benchmark, end to end, offline."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from tabpo.cli.common import console, handles_errors, quiet_libraries


@handles_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output directory (data, runs, report).")] = Path(
        "tabpo-demo"
    ),
    backend: Annotated[str, typer.Option(help="mlx, torch or auto.")] = "auto",
    seeds: Annotated[int, typer.Option(help="Seeds per method (mean and spread).")] = 1,
    quick: Annotated[bool, typer.Option(help="A smaller run (~2 minutes) to try it out.")] = False,
    full: Annotated[
        bool, typer.Option(help="All baselines (DPO, IPO, SimPO, Cal-DPO, DPOP), 3 seeds.")
    ] = False,
    model: Annotated[
        Path | None, typer.Option(help="SFT model (default: the shipped tiny model).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per method.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    learning_rate: Annotated[
        float | None, typer.Option(help="Learning rate of every method.")
    ] = None,
    eval_split: Annotated[
        str, typer.Option(help="test, or dev to choose hyperparameters.")
    ] = "test",
    methods: Annotated[str | None, typer.Option(help="Comma-separated losses to train.")] = None,
) -> None:
    """Load the shipped SFT model, build pairs from its confusions, train DPO and TAB-PO
    under the same budget, evaluate SFT vs DPO vs TAB-PO on held-out test phrasings, and
    write report.md and figure.png."""
    from tabpo.backends import get_backend, resolve
    from tabpo.cli.ui import progress_callbacks
    from tabpo.clinical import report
    from tabpo.clinical.demo import FULL_METHODS, OUTPUTS, DemoSettings, run_demo
    from tabpo.common.errors import TabpoError
    from tabpo.common.files import OutputDir
    from tabpo.models.tiny import SHIPPED

    quiet_libraries()
    output = OutputDir(out)
    output.check(force=force, option="--out")
    model = model or SHIPPED
    if not (model / "config.json").is_file():
        raise TabpoError(f"no SFT model at {model}: run `tabpo build-model --install` first")
    s = DemoSettings(out=out, model=model, backend=resolve(backend), seeds=seeds)
    if full:
        s.methods, s.seeds = FULL_METHODS, max(seeds, 3)
    if quick:
        s.pref_size, s.test_size, s.steps = 200, 100, 40
    if steps is not None:
        s.steps = steps
    if learning_rate is not None:
        s.learning_rate = learning_rate
    if methods is not None:
        s.methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    if eval_split not in ("test", "dev"):
        raise TabpoError("--eval-split must be test or dev")
    s.eval_split = eval_split
    if force:
        output.clear()
    output.record(*OUTPUTS)
    started = time.perf_counter()
    with progress_callbacks() as callbacks:
        result = run_demo(s, get_backend, callbacks)
    path = report.write(result, out, "tabpo " + " ".join(sys.argv[1:]))
    console.print(report.table(result))
    console.print(f"[green]report[/]: {path}  figure: {out / 'figure.png'}  "
                  f"(demo took {time.perf_counter() - started:.0f} s)")  # fmt: skip
