"""``tabpo parity``: prove both backends compute the same loss and gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich import box
from rich.table import Table

from tabpo.cli.common import console, handles_errors, load_adapter, quiet_libraries
from tabpo.common.errors import TabpoError


@handles_errors
def parity(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the shipped tiny model).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Preference pairs, JSONL (default: pairs of the embedded benchmark)."),
    ] = None,
    loss: Annotated[
        list[str] | None, typer.Option(help="Loss to compare (repeat it); default: all.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter (PEFT or mlx-lm) to load in both.")
    ] = None,
    ref: Annotated[
        Path | None, typer.Option(help="Reference model (compares full fine-tuning).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    pairs: Annotated[int, typer.Option(help="How many pairs of --data to use.")] = 4,
    max_length: Annotated[int, typer.Option(help="Prompt + completion tokens.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the LoRA factors without --adapter.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Load both backends on the same weights and batch; compare per-token log-probs, every
    requested loss with its metrics and gradient, and the model's backward. Each backend also
    runs in float64: a row fails only when the backends differ by more than twice their own
    rounding errors. Exit code 1 on any failure."""
    import time

    from tabpo import losses
    from tabpo.backends import get_backend
    from tabpo.cli.ui import progress_callbacks
    from tabpo.data.batching import collate
    from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
    from tabpo.data.records import read_preferences
    from tabpo.models.tiny import SHIPPED
    from tabpo.training.backend import DTYPES, LoraSettings, ModelOptions
    from tabpo.training.parity import compare_backends

    quiet_libraries()
    start = time.perf_counter()
    model = model or SHIPPED
    names = loss or losses.names()
    for name in names:
        losses.get(name)
    if dtype not in DTYPES:
        raise TabpoError(f"--dtype must be one of {', '.join(DTYPES)}")
    if adapter is not None and ref is not None:
        raise TabpoError("--adapter and --ref contradict: --ref compares full fine-tuning")
    tokenizer = load_tokenizer(model)
    examples = read_preferences(data or _benchmark_pairs(pairs))[0][:pairs]
    encoded, _ = encode_pairs(tokenizer, examples, max_length=max_length)
    batch = collate(encoded, pad_id(tokenizer))
    random_state: dict[str, np.ndarray] = {}

    def load(name: str, run_dtype: str):
        backend = get_backend(name)
        if adapter is not None:
            load_adapter(backend, model, adapter, run_dtype)
            return backend
        backend.load(ModelOptions(
            path=str(model), dtype=run_dtype, finetune="full" if ref else "lora",
            lora=LoraSettings(dropout=0.0), ref_path=str(ref) if ref else None,
        ))  # fmt: skip
        if ref is None:  # the same seeded adapter in every run
            if not random_state:
                random_state.update(_random_adapter(backend, seed))
            backend.load_trainable_state(random_state)
        return backend

    with progress_callbacks() as callbacks:
        report = compare_backends(load, batch, names, dtype, seed=seed, callbacks=callbacks)
    seconds = time.perf_counter() - start
    if as_json:
        console.print_json(json.dumps({**report.to_dict(), "total_seconds": round(seconds, 1)}))
    else:
        console.print(_table(report))
        console.print(f"[{'green' if report.ok else 'bold red'}]{report.verdict()}[/]",
                      highlight=False, soft_wrap=True)  # fmt: skip
        runs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
        console.print(f"{seconds:.1f} s in all ({runs})", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def _benchmark_pairs(count: int) -> Path:
    """A few rule-built pairs of the embedded benchmark, in a temporary file."""
    import tempfile

    from tabpo.clinical import generate_split
    from tabpo.clinical.pairs import build_pairs
    from tabpo.common.files import write_jsonl

    rows, _ = build_pairs(generate_split("pref", 4 * count), strategy="rule", seed=0)
    return write_jsonl(rows[:count], Path(tempfile.mkdtemp()) / "pairs.jsonl")


def _random_adapter(backend, seed: int) -> dict[str, np.ndarray]:
    """Seeded LoRA factors with a non-zero B, so the adapter changes the function."""
    from tabpo.training.backend import seeded_lora_init

    state = seeded_lora_init(backend.trainable_state(), seed)
    rng = np.random.default_rng([seed, 0xB])
    return {k: (rng.normal(0.0, 0.02, v.shape).astype(np.float32) if k.endswith("lora_B")
                else v) for k, v in state.items()}  # fmt: skip


def _table(report) -> Table:
    """One row per quantity, at most 120 columns: each side's value (log-probs: the signed
    total; arrays: their norm), how far apart they are, each stack's own rounding error
    (against itself in float64), and the ratio the verdict reads (pass at <= K)."""
    from tabpo.training.parity import K

    table = Table(title=f"torch vs mlx ({report.dtype}): pass = |torch - mlx| <= {K:g} x "
                  "(torch error + mlx error), each against itself in float64",
                  box=box.SIMPLE_HEAD, pad_edge=False)  # fmt: skip
    table.add_column("quantity", no_wrap=True, max_width=40, overflow="ellipsis")
    for column in ("torch", "mlx", "|t - m|", "torch err", "mlx err", "ratio", "pass"):
        table.add_column(column, justify="right", no_wrap=True)
    for c in report.checks:
        mark = "[green]pass[/]" if c.ok else "[bold red]FAIL[/]"
        numbers = (c.torch, c.mlx, c.diff, c.torch_error, c.mlx_error, c.ratio)
        table.add_row(c.quantity, *(f"{x:{spec}}" for x, spec in zip(
            numbers, (".6g", ".6g", ".1e", ".1e", ".1e", ".2f"), strict=True)), mark)  # fmt: skip
    return table
