"""``tabpo convert``: a model or a LoRA adapter from one stack's format to the other's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tabpo.cli.common import console, handles_errors, quiet_libraries

if TYPE_CHECKING:
    from tabpo.models.convert import Outcome

To = Annotated[str, typer.Option("--to", help="Target stack: torch or mlx.")]
Dtype = Annotated[
    str | None,
    typer.Option(help="Cast floating tensors to float32, bfloat16 or float16 (default: keep)."),
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing destination.")]
Verify = Annotated[
    bool | None,
    typer.Option(
        "--verify/--no-verify",
        help="Compare log-probs of source and result (default: on when torch and mlx are "
        "both installed).",
        show_default=False,
    ),
]
Tolerance = Annotated[
    float | None,
    typer.Option(help="Largest allowed log-prob difference (default: 1e-4; bf16 0.1, fp16 0.02)."),
]


@handles_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Model directory, PEFT or mlx-lm adapter.")],
    dst: Annotated[Path, typer.Argument(help="Directory to write (must not exist).")],
    to: To,
    base: Annotated[
        Path | None,
        typer.Option(help="Base model of an adapter (checked against it; needed to verify)."),
    ] = None,
    dtype: Dtype = None,
    force: Force = False,
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Dequantize MLX-quantized weights.")
    ] = False,
    verify: Verify = None,
    tolerance: Tolerance = None,
) -> None:
    """Convert a model directory or a LoRA adapter between PyTorch (transformers / PEFT) and
    MLX (mlx-lm). The result is verified, then moved into place: on any error nothing is
    written."""
    from tabpo.models.convert import convert as run

    quiet_libraries()
    outcome = run(
        src,
        dst,
        to=to,
        base=base,
        dtype=dtype,
        force=force,
        dequantize=dequantize,
        verify_result=verify,
        tolerance=tolerance,
    )
    print_outcome(outcome, "converted")


def print_outcome(outcome: Outcome, verb: str) -> None:
    """One summary line (what, where, the verification's max difference), then any notes."""
    from tabpo.models.convert import KINDS

    stack = {"torch": "PyTorch", "mlx": "MLX"}[outcome.to]
    result = f"{stack} model" if outcome.result == "model" else KINDS[outcome.result]
    v = outcome.verification
    checked = (
        f"verified: max |Δ log-prob| {v.max_diff:.2e} ≤ {v.tolerance:.0e} ({v.source} vs "
        f"{v.result})"
        if v is not None
        else f"[yellow]{outcome.unverified}[/]"
    )
    console.print(
        f"[green]{verb}[/] {KINDS[outcome.kind]} -> {result} [bold]{outcome.dst}[/] "
        f"({outcome.detail}); {checked}",
        highlight=False,
        soft_wrap=True,
    )
    for note in outcome.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
