"""The core (everything under tabpo/) must load neither torch nor mlx."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
from pathlib import Path
import tabpo
core = Path(tabpo.__file__).parent
names = ["tabpo"] + [
    m.name for m in pkgutil.walk_packages([str(core)], prefix="tabpo.")
]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mlx", "transformers"))
print(len(names), heavy[:5])
"""


def test_core_imports_no_backend():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.split(" ", 1)
    assert int(count) >= 8, f"walked only {count} core modules"
    assert heavy.strip() == "[]", f"the core imported {heavy.strip()}"


def test_cli_help_loads_no_backend():
    """`tabpo --help` must stay fast: the CLI imports backends only inside commands."""
    code = (
        "import sys; from typer.testing import CliRunner; from tabpo.cli.app import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_dash_m_tabpo_is_the_cli(tmp_path):
    """`python -m tabpo` (what torchrun -m and mlx.launch start) is the tabpo command."""
    out = subprocess.run([sys.executable, "-m", "tabpo", "--version"], capture_output=True,
                         text=True, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("tabpo ")
