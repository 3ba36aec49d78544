"""Errors the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


@contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Inside the block, any failure to read ``path`` (a library's own exception included)
    becomes one TabpoError naming the file and what is wrong with it."""
    try:
        yield
    except TabpoError:
        raise
    except Exception as exc:  # a damaged file surfaces as whatever its reader raises
        lines = str(exc).strip().splitlines() or [""]
        detail = f"{type(exc).__name__}: {lines[0][:200]}"
        raise TabpoError(f"{path}: cannot read {what or 'this file'} ({detail})") from None


def read_json(path: Path) -> Any:
    """A JSON file's value; a missing or invalid file is one line naming it (and the line)."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise TabpoError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        line = getattr(exc, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        raise TabpoError(f"{where}: invalid JSON: {getattr(exc, 'msg', exc)}") from None
