"""Errors the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class TabpoError(Exception):
    """A user-facing error: the message alone says what is wrong and where."""


class DataError(TabpoError):
    """Bad input data, located by file, line and field where known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.line, self.field = path, line, field
        where = str(path) if path is not None else ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(f"{where}: {message}" if where else message)
