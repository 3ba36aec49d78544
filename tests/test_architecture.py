"""The folders show the parts, and each part imports only what its ``__init__`` allows.

The docstring of every part's ``__init__.py`` says in two lines what the part is and ends
with "May import: ..." (project packages, "nothing" or "anything"). These tests read that
sentence and check every import of every module of the part against it, imports inside
functions and under TYPE_CHECKING included, so the documented direction
(common <- losses <- data <- training <- clinical, models beside them) is the enforced one.
"""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the packages that live outside tabpo/ (pyproject.toml's package-dir)
OUTSIDE = {"tabpo.backends": "backends", "tabpo.models": "models", "tabpo.cli": "cli"}
_NAME = re.compile(r"tabpo(?:\.\w+)?")


def parts(root: Path) -> dict[str, Path]:
    """Part name -> its folder: every subpackage of tabpo/, and the packages outside it."""
    found = {f"tabpo.{d.name}": d for d in sorted((root / "tabpo").iterdir())
             if (d / "__init__.py").is_file()}  # fmt: skip
    found.update({name: root / folder for name, folder in OUTSIDE.items()
                  if (root / folder / "__init__.py").is_file()})  # fmt: skip
    return found


def may_import(folder: Path) -> set[str] | None:
    """The parts named by the "May import:" sentence of the part's docstring (None: any)."""
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    found = re.search(r"May import:\s*(.+?)\.(?:\s|$)", doc, re.DOTALL)
    assert found, f"{folder / '__init__.py'}: the docstring has no 'May import:' sentence"
    said = found.group(1)
    return None if said.strip().startswith("anything") else set(_NAME.findall(said))


def imported_parts(path: Path) -> set[str]:
    """The project parts (``tabpo.X``, or ``tabpo`` itself) a module imports anywhere."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = ([f"tabpo.{a.name}" for a in node.names] if node.module == "tabpo"
                     else [node.module])  # fmt: skip
        else:
            continue
        for name in names:
            if name == "tabpo" or name.startswith("tabpo."):
                out.add(".".join(name.split(".")[:2]))
    return out


def violations(root: Path) -> list[tuple[str, str]]:
    """(module, part it imports but may not) over the whole tree."""
    known = parts(root)
    found = []
    for part, folder in known.items():
        allowed = may_import(folder)
        if allowed is None:
            continue
        for path in sorted(folder.rglob("*.py")):
            for target in sorted(imported_parts(path)):
                # the top package holds only the version and the re-exported TabpoError
                target = "tabpo.common" if target == "tabpo" or target not in known else target
                if target != part and target not in allowed:
                    found.append((str(path.relative_to(root)), target))
    return found


def test_every_part_imports_only_what_its_docstring_allows():
    bad = violations(ROOT)
    assert not bad, "imports against the declared direction: " + "; ".join(
        f"{module} imports {target}" for module, target in bad
    )


def test_the_declared_direction_has_no_cycle():
    graph = {}
    for part, folder in parts(ROOT).items():
        allowed = may_import(folder)
        graph[part] = set() if allowed is None else allowed
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"the parts may import each other in a cycle: {exc.args[1]}")
    assert (
        order.index("tabpo.common")
        < order.index("tabpo.losses")
        < order.index("tabpo.data")
        < order.index("tabpo.training")
        < order.index("tabpo.clinical")
    )


def test_the_core_is_its_parts_and_nothing_loose():
    """tabpo/ holds only its __init__ and the part folders: a newcomer sees the parts."""
    entry = ("__init__.py", "__main__.py")  # __main__: `python -m tabpo`, the CLI's entry point
    loose = sorted(p.name for p in (ROOT / "tabpo").glob("*.py") if p.name not in entry)
    assert not loose, f"modules outside any part: {loose}"
    assert {"tabpo.common", "tabpo.losses", "tabpo.data", "tabpo.training",
            "tabpo.clinical"} <= set(parts(ROOT))  # fmt: skip


def test_the_checker_finds_a_lazy_import_against_the_direction(tmp_path):
    """A function-level import from a part that may not be imported is reported."""
    files = {
        "tabpo/__init__.py": "",
        "tabpo/common/__init__.py": '"""Base.\nMay import: nothing of the project."""\n',
        "tabpo/low/__init__.py": '"""Low.\nMay import: tabpo.common."""\n',
        "tabpo/high/__init__.py": '"""High.\nMay import: tabpo.common, tabpo.low."""\n',
        "tabpo/high/ok.py": "from tabpo.low import thing\nfrom tabpo import common\n",
        "tabpo/low/bad.py": "def f():\n    from tabpo.high.ok import thing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations(tmp_path) == [("tabpo/low/bad.py", "tabpo.high")]
