"""Files written so that a reader never sees half of one: a temporary sibling, then a rename.

Shared by training (checkpoints), ``models`` (conversions, merges) and the applications
(data sets, predictions). ``STATE_FILE`` is named here because both sides need it:
training writes it into every checkpoint, ``models`` leaves it out when it copies a
checkpoint's non-weight files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Create ``target`` atomically: ``fill`` a sibling temporary directory, then rename.

    An existing ``target`` is replaced only after the new one is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def publish_files(source: Path, target: Path) -> None:
    """Move every file of ``source`` into ``target`` one atomic rename at a time."""
    for item in sorted(source.iterdir()):
        os.replace(item, target / item.name)


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """One compact JSON object per line, UTF-8, "\\n" line ends; same records, same bytes.
    Written to a temporary file and renamed, so a file is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
