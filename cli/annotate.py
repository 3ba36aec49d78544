"""``tabpo data``, ``tabpo eval`` and ``tabpo pairs``: the annotation benchmark's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tabpo.cli.common import console, handles_errors, load_adapter, quiet_libraries
from tabpo.common.errors import TabpoError

Backend = Annotated[str, typer.Option(help="mlx, torch or auto.")]
MaxNew = Annotated[int, typer.Option(help="Longest answer, in tokens.")]


@handles_errors
def data(
    out: Annotated[Path, typer.Option(help="Directory for train/pref/dev/test.jsonl.")],
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Write the synthetic clinical-message benchmark (prompt/completion JSONL splits)."""
    from tabpo.clinical import write_splits

    if out.exists() and any(out.glob("*.jsonl")) and not force:
        raise TabpoError(f"{out} already holds JSONL files (use --force)")
    for split, path in write_splits(out, seed=seed).items():
        console.print(f"{split}: {path} ({sum(1 for _ in open(path))} records)")


def load_model(backend: str, model: Path, adapter: Path | None, dtype: str) -> tuple[Any, Any]:
    """A backend holding the model (and adapter) for inference, and its tokenizer."""
    from tabpo.backends import get_backend
    from tabpo.data.encoding import load_tokenizer
    from tabpo.training.backend import ModelOptions

    quiet_libraries()
    impl = get_backend(backend)
    if adapter is None:
        impl.load(ModelOptions(path=str(model), dtype=dtype, finetune="full",
                               keep_reference=False))  # fmt: skip
    else:
        load_adapter(impl, model, adapter, dtype)
    return impl, load_tokenizer(model)


def decode(impl: Any, tokenizer: Any, records: list[dict[str, Any]], **options: Any) -> list[str]:
    """The model's greedy answers, with progress (greedy decoding takes minutes)."""
    from tabpo.cli.ui import progress_callbacks
    from tabpo.clinical.annotate import predict

    with progress_callbacks() as callbacks:
        callbacks.phase("decoding", len(records))
        return predict(impl, tokenizer, records, **options,
                       progress=lambda n: callbacks.advance("decoding", n))  # fmt: skip


@handles_errors
def eval(  # noqa: A001 (the command's name)
    model: Annotated[Path, typer.Option(help="Model directory.")],
    data: Annotated[Path, typer.Option(help="Prompt/completion JSONL (e.g. test.jsonl).")],
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter (PEFT or mlx-lm).")] = None,
    backend: Backend = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    max_new_tokens: MaxNew = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 32,
    snap: Annotated[bool, typer.Option(help="Also report spans snapped to the message.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the metrics to this JSON file, and every prediction with its "
            "gold answer beside it, to OUT's name with .predictions.jsonl."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out and its predictions.")] = False,
) -> None:
    """Greedy-decode every prompt and score it: Code / Sub-code micro-F1, relaxed Span F1
    (the paper's), strict triplet F1, JSON validity (docs/method.md §5)."""
    from tabpo.clinical.annotate import evaluate, read_records

    records = read_records(data)
    written = [out, out.with_suffix(".predictions.jsonl")] if out is not None else []
    if not force and any(p.exists() for p in written):
        raise TabpoError(f"{out} or its predictions exist (use --force to overwrite them)")
    impl, tokenizer = load_model(backend, model, adapter, dtype)
    predictions = decode(impl, tokenizer, records, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)  # fmt: skip
    scores = evaluate(records, predictions, snap=snap)
    console.print(metrics_table({str(model.name if adapter is None else adapter.name): scores}))
    if out is not None:
        from tabpo.common.files import write_jsonl, write_text

        doc = {"model": str(model), "adapter": str(adapter) if adapter else None,
               "data": str(data), "metrics": scores}  # fmt: skip
        write_text(out, json.dumps(doc, indent=2) + "\n")
        write_jsonl([{"prediction": p, "gold": r["completion"]} for p, r in
                     zip(predictions, records, strict=True)], written[1])  # fmt: skip
        console.print(f"metrics: {out}  predictions: {written[1]}")


@handles_errors
def pairs(
    data: Annotated[Path, typer.Option(help="Prompt/completion JSONL (the preference split).")],
    out: Annotated[Path, typer.Option(help="Where to write the pairs JSONL.")],
    model: Annotated[
        Path | None, typer.Option(help="SFT model whose confusions drive the edits.")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="confusion (the paper's), model (its own wrong answers), rule.")
    ] = "confusion",
    backend: Backend = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the edits.")] = 0,
    max_new_tokens: MaxNew = 256,
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Build preference pairs by docs/method.md §4: minimal schema-valid edits of the gold answer
    drawn from the model's confusions (or the model's own wrong answers, or uniform rules)."""
    from tabpo.clinical.annotate import make_pairs, read_records
    from tabpo.common.files import write_jsonl

    if strategy not in ("confusion", "model", "rule"):
        raise TabpoError("--strategy must be confusion, model or rule")
    if strategy != "rule" and model is None:
        raise TabpoError(f"--strategy {strategy} needs --model (or use --strategy rule)")
    if out.exists() and not force:
        raise TabpoError(f"{out} exists (use --force)")
    records = read_records(data)
    predictions = None
    if model is not None and strategy != "rule":
        impl, tokenizer = load_model(backend, model, None, "float32")
        predictions = decode(impl, tokenizer, records, max_new_tokens=max_new_tokens)
    rows, stats = make_pairs(records, predictions, strategy=strategy, seed=seed)
    write_jsonl(rows, out)
    console.print(f"{len(rows)} pairs -> {out}; " + ", ".join(f"{k} {v}" for k, v in
                                                               stats.items()))  # fmt: skip


SHOWN = [("code/f1", "Code F1"), ("subcode/f1", "Sub-code F1"), ("span/f1", "Span F1"),
         ("triplet/f1", "strict F1"), ("json_valid", "JSON valid"),
         ("span_verbatim", "verbatim spans"), ("snap_span/f1", "Span F1 (snapped)")]  # fmt: skip


def metrics_table(rows: dict[str, dict[str, float]]) -> Table:
    table = Table()
    table.add_column("model")
    keys = [(k, label) for k, label in SHOWN if any(k in r for r in rows.values())]
    for _, label in keys:
        table.add_column(label, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[k]:.3f}" if k in scores else "-" for k, _ in keys))
    return table
