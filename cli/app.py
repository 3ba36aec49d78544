"""The ``tabpo`` command: one Typer app, one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from tabpo import __version__
from tabpo.cli import annotate as annotate_cmd
from tabpo.cli import build_model as build_model_cmd
from tabpo.cli import convert as convert_cmd
from tabpo.cli import demo as demo_cmd
from tabpo.cli import inspect as inspect_cmd
from tabpo.cli import merge as merge_cmd
from tabpo.cli import parity as parity_cmd
from tabpo.cli import train as train_cmd

app = typer.Typer(
    name="tabpo",
    help="Token-Adaptive Barrier Preference Optimization on MLX and PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("convert")(convert_cmd.convert)
app.command("build-model")(build_model_cmd.build_model)
app.command("data")(annotate_cmd.data)
app.command("demo")(demo_cmd.demo)
app.command("eval")(annotate_cmd.eval)
app.command("pairs")(annotate_cmd.pairs)
app.command("inspect")(inspect_cmd.inspect)
app.command("merge")(merge_cmd.merge)
app.command("parity")(parity_cmd.parity)
app.command("train")(train_cmd.train)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tabpo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Token-Adaptive Barrier Preference Optimization on MLX and PyTorch."""


def main() -> None:
    app()
