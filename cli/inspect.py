"""``tabpo inspect``: one pair exactly as the trainer sees it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tabpo.cli.common import console, handles_errors
from tabpo.common.errors import DataError, TabpoError
from tabpo.data.encoding import EncodedPair, encode_pairs, load_tokenizer
from tabpo.data.records import read_preferences
from tabpo.losses.weights import ALIGNMENTS, difference_masks


@handles_errors
def inspect(
    model: Annotated[Path, typer.Option(help="Model directory (only its tokenizer is loaded).")],
    data: Annotated[Path, typer.Option(help="Preference JSONL (standard or conversational).")],
    index: Annotated[int, typer.Option(help="Which pair of the file, counting from 0.")] = 0,
    max_length: Annotated[int, typer.Option(help="Prompt + completion token budget.")] = 1024,
    align: Annotated[str, typer.Option(help="Difference alignment: edit or position.")] = "edit",
    prompt_tokens: Annotated[
        int, typer.Option(help="How many trailing prompt tokens to show.")
    ] = 12,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a view.")] = False,
) -> None:
    """Show one pair as the trainer sees it: completion tokens coloured by weight, differing
    tokens underlined, the prompt (mask 0) dimmed."""
    if align not in ALIGNMENTS:
        raise TabpoError(f"--align must be one of {', '.join(ALIGNMENTS)}, not '{align}'")
    examples, _ = read_preferences(data)
    if not 0 <= index < len(examples):
        raise TabpoError(f"--index {index} is out of range: {data} holds {len(examples)} pairs")
    tokenizer = load_tokenizer(model)
    try:
        pairs, _ = encode_pairs(tokenizer, [examples[index]], max_length=max_length, align=align)
    except DataError as exc:  # the one example was skipped: say where it is
        line = examples[index].line
        raise DataError(f"pair {index} is skipped: {exc}", path=data, line=line) from None
    pair = pairs[0]
    views = {side: _side(tokenizer, pair, side, align) for side in ("chosen", "rejected")}
    if as_json:
        doc = {"index": index, "line": pair.line, "prompt_length": len(pair.prompt_ids), **views}
        console.print_json(json.dumps(doc))
        return
    console.print(
        f"[bold]{data}[/] line {pair.line} (pair {index}), {len(pair.prompt_ids)} "
        f"prompt tokens, align={align}"
    )
    for side, view in views.items():
        console.print(_render(side, view, prompt_tokens))
    console.print(_legend())


def _side(tokenizer: Any, pair: EncodedPair, side: str, align: str) -> dict[str, Any]:
    """Token strings, ids, completion mask, weights and difference flags of one sequence."""
    completion = getattr(pair, f"{side}_ids")
    differs = difference_masks(pair.chosen_ids, pair.rejected_ids, align=align)
    diff = differs[0] if side == "chosen" else differs[1]
    ids = list(pair.prompt_ids) + list(completion)
    n_prompt = len(pair.prompt_ids)
    weights = [0.0] * n_prompt + [float(w) for w in getattr(pair, f"{side}_weights")]
    return {
        "tokens": [tokenizer.decode([i]) for i in ids],
        "ids": ids,
        "mask": [0] * n_prompt + [1] * len(completion),
        "weights": [round(w, 6) for w in weights],
        "differs": [False] * n_prompt + [bool(d) for d in diff],
    }


def _style(weight: float, differs: bool) -> str:
    colour = "white" if weight <= 1.0 else "yellow" if weight < 1.15 else "orange1"
    if weight > 1.3:
        colour = "red"
    return f"bold {colour} underline" if differs else colour


def _render(side: str, view: dict[str, Any], prompt_tokens: int) -> Table:
    text = Text()
    n_prompt = view["mask"].count(0)
    if n_prompt > prompt_tokens:
        text.append(f"… {n_prompt - prompt_tokens} prompt tokens … ", style="dim italic")
    for i, (tok, m, w, d) in enumerate(
        zip(view["tokens"], view["mask"], view["weights"], view["differs"], strict=True)
    ):
        if not m:
            if i >= n_prompt - prompt_tokens:
                text.append(tok, style="dim")
            continue
        text.append(tok.replace("\n", "⏎\n"), style=_style(w, d))
    table = Table(
        title=f"{side}: {len(view['ids']) - n_prompt} completion tokens",
        show_header=False,
        title_justify="left",
        expand=True,
    )
    table.add_row(text)
    return table


def _legend() -> Text:
    legend = Text("weights: ")
    for label, style in [
        ("1.0", "white"),
        ("1.1", "yellow"),
        ("1.2", "orange1"),
        ("> 1.3", "red"),
        ("differs", "bold underline"),
        ("prompt (mask 0)", "dim"),
    ]:
        legend.append(label, style=style).append("  ")
    return legend
