"""MLX and PyTorch implementations of the core's ``Backend`` contract (tabpo.training.backend).
May import: tabpo.common, tabpo.losses, tabpo.data, tabpo.training, tabpo.models.

Chosen at the edge (the CLI) and handed to the loop; imported lazily, so installing only one
of the two extras works, and asking for the missing one says which extra to install. The
core never imports this package.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import TYPE_CHECKING

from tabpo.common.errors import TabpoError

if TYPE_CHECKING:
    from tabpo.training.backend import Backend

_REQUIRES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx_lm")}


def available(name: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _REQUIRES[name])


def resolve(name: str) -> str:
    """``auto`` is MLX on Apple silicon when installed, else torch."""
    if name != "auto":
        return name
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple and available("mlx"):
        return "mlx"
    if available("torch"):
        return "torch"
    if available("mlx"):
        return "mlx"
    raise TabpoError("no backend installed: pip install 'tabpo[torch]' or 'tabpo[mlx]'")


def get_backend(name: str) -> Backend:
    """A fresh backend instance by name (mlx, torch or auto)."""
    name = resolve(name)
    if name not in _REQUIRES:
        raise TabpoError(f"unknown backend '{name}' (choose mlx, torch or auto)")
    missing = [m for m in _REQUIRES[name] if importlib.util.find_spec(m) is None]
    if missing:
        raise TabpoError(
            f"the {name} backend needs {', '.join(missing)}: pip install 'tabpo[{name}]'"
        )
    if name == "torch":
        from tabpo.backends.torch import TorchBackend

        return TorchBackend()
    from tabpo.backends.mlx import MlxBackend

    return MlxBackend()
