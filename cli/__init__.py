"""The ``tabpo`` command-line interface (Typer + Rich)."""
