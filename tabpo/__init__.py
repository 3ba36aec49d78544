"""tabpo: Token-Adaptive Barrier Preference Optimization on MLX and PyTorch.

The core package (everything under ``tabpo/``) is backend-agnostic: it never imports torch
or mlx. Backends live in ``tabpo.backends`` and are imported lazily.
"""

from tabpo.common.errors import TabpoError

__version__ = "0.1.0"
__all__ = ["TabpoError", "__version__"]
