"""``tabpo merge``: fold a LoRA adapter into its base model, for plain transformers or mlx-lm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tabpo.cli.common import handles_errors, quiet_libraries
from tabpo.cli.convert import Dtype, Force, To, Tolerance, Verify, print_outcome


@handles_errors
def merge(
    adapter: Annotated[Path, typer.Argument(help="PEFT or mlx-lm adapter directory.")],
    dst: Annotated[Path, typer.Argument(help="Model directory to write (must not exist).")],
    base: Annotated[Path, typer.Option(help="The adapter's base model directory.")],
    to: To,
    dtype: Dtype = None,
    force: Force = False,
    verify: Verify = None,
    tolerance: Tolerance = None,
) -> None:
    """Merge W' = W + scale * B A (DoRA: rescaled rows) into the base model and write a full
    model directory for either stack, verified against base + adapter."""
    from tabpo.models.merge import merge as run

    quiet_libraries()
    outcome = run(
        adapter,
        dst,
        base=base,
        to=to,
        dtype=dtype,
        force=force,
        verify_result=verify,
        tolerance=tolerance,
    )
    print_outcome(outcome, "merged")
