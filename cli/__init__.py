"""The ``tabpo`` command-line interface (Typer + Rich), one thin module per command.
May import: anything of the project (it is the edge that chooses the backend)."""
