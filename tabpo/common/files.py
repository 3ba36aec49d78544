"""Files written so that a reader never sees half of one, and output directories that keep
what is not tabpo's.

Every write goes to a temporary sibling, is flushed to disk (fsync), and is renamed into
place; the directory entry is flushed too. A set of files that must change together (a
checkpoint, the final weights) is one directory renamed at once (``write_dir``), or reached
through one symbolic link swapped at once (``point``).

Shared by training (checkpoints, final weights), ``models`` (conversions, merges) and the
applications (data sets, predictions). ``STATE_FILE`` is named here because both sides need
it: training writes it into every checkpoint, ``models`` leaves it out when it copies a
checkpoint's non-weight files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tabpo.common.errors import TabpoError

STATE_FILE = "trainer_state.json"
MARKER = ".tabpo-output.json"


def write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Create ``target`` atomically: ``fill`` a sibling temporary directory, flush it to
    disk, then rename. An existing ``target`` is replaced only after the new one is
    complete; temporaries of an earlier, killed attempt are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        remove(stale)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        fill(tmp)
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    sync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically (temporary sibling, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """One compact JSON object per line, UTF-8, "\\n" line ends; same records, same bytes;
    written atomically."""
    path = Path(path)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def point(link: Path, target: str) -> None:
    """Make ``link`` a symbolic link to ``target`` (relative to its directory), swapping an
    existing link in one rename: a reader follows the old target or the new, never none."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    sync_dir(link.parent)


def sync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (and ``root``) to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as fh:
                os.fsync(fh.fileno())
        sync_dir(Path(directory))


def sync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """A file, a link or a whole directory; nothing if it is not there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class OutputDir:
    """A directory tabpo writes its results into, marked by ``MARKER``: the marker lists
    every top-level entry tabpo created there, so replacing the directory (``--force``)
    removes exactly those and nothing of the user's, and a non-empty directory without it
    is never touched."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def check(self, *, force: bool, option: str = "--output", also: str = "") -> None:
        """Before any work: an absent or empty directory is fine; a non-empty one must be
        tabpo's and ``force`` given (``also``: another way out, e.g. " or --resume")."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise TabpoError(f"{option} {self.path} is a file, not a directory")
        if not any(self.path.iterdir()):
            return
        if not self.marker.is_file():
            raise TabpoError(
                f"{option} {self.path} is not empty and was not written by tabpo (no {MARKER}): "
                f"refusing to replace anything in it; choose another {option}"
            )
        if not force:
            raise TabpoError(f"{option} {self.path} exists (use --force{also}; --force replaces "
                             "only what tabpo wrote there)")  # fmt: skip

    def written(self) -> list[str]:
        """The top-level entries the marker lists."""
        try:
            names = json.loads(self.marker.read_text())["written"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        # only plain names of this directory: a damaged marker must not reach outside it
        plain = [n for n in names if isinstance(n, str) and Path(n).name == n]
        return [n for n in plain if n not in ("", "..")]

    def record(self, *names: str) -> None:
        """Add top-level entries to what tabpo wrote here (creating the directory)."""
        self._write([*self.written(), *names])

    def forget(self, *names: str) -> None:
        """Entries tabpo removed again (an old checkpoint past ``--save-total-limit``)."""
        self._write([n for n in self.written() if n not in names])

    def _write(self, names: list[str]) -> None:
        body = {"tool": "tabpo", "written": list(dict.fromkeys(names))}
        write_text(self.marker, json.dumps(body, indent=1) + "\n")

    def clear(self) -> None:
        """Remove what tabpo wrote here (the entries the marker lists, temporaries of a
        killed run) and the marker; anything else stays."""
        for name in self.written():
            remove(self.path / name)
        self.clean_stale()
        remove(self.marker)

    def clean_stale(self) -> None:
        """Temporary entries a killed process left behind (``write_dir``'s, ``write_text``'s
        and ``point``'s)."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if entry.name.startswith(".") and (".tmp" in entry.name or ".old-" in entry.name):
                remove(entry)
