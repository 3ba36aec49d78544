"""The array protocol: find the namespace of the arrays, plus the helpers losses need.

NumPy and torch arrays go through array-api-compat; MLX arrays use ``mlx.core``, which is
close enough to the array API for everything the losses do (docs/design.md, "Adding a
loss"). Nothing here imports torch or mlx: the namespace comes from the arrays themselves.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import array_api_compat

Array = Any


def _is_mlx(x: object) -> bool:
    return type(x).__module__.startswith("mlx")


def namespace(*arrays: Array) -> ModuleType:
    """The array namespace shared by ``arrays`` (``None`` entries are ignored)."""
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("namespace() needs at least one array")
    if any(_is_mlx(a) for a in present):
        if not all(_is_mlx(a) for a in present):
            raise TypeError("cannot mix MLX arrays with arrays of another library")
        return sys.modules["mlx.core"]
    return array_api_compat.array_namespace(*present)


def like(x: Array, ref: Array) -> Array:
    """``x`` as an array of ``ref``'s namespace, device and floating dtype."""
    xp = namespace(ref)
    if _is_mlx(ref):
        # mx.array(x) alone makes float64 input float32: name the dtype
        return x.astype(ref.dtype) if _is_mlx(x) else xp.array(x, dtype=ref.dtype)
    if namespace(x) is xp:
        return xp.astype(x, ref.dtype) if x.dtype != ref.dtype else x
    return xp.asarray(x, dtype=ref.dtype, device=array_api_compat.device(ref))


def log_sigmoid(x: Array, xp: ModuleType) -> Array:
    """``log s(x) = -log(1 + e^-x)``, stable for large ``|x|``."""
    return -xp.logaddexp(xp.zeros_like(x), -x)


def softplus(x: Array, xp: ModuleType) -> Array:
    """``log(1 + e^x)``."""
    return xp.logaddexp(xp.zeros_like(x), x)


def sigmoid(x: Array, xp: ModuleType) -> Array:
    return xp.exp(log_sigmoid(x, xp))


def relu(x: Array, xp: ModuleType) -> Array:
    return xp.maximum(x, xp.zeros_like(x))


# float32's machine epsilon: a log-prob closer to 0 than this is 0 within float32 rounding
LOG_PROB_CEILING = -(2.0**-23)


def log1mexp(x: Array, xp: ModuleType) -> Array:
    """``log(1 - e^x)`` for ``x < 0``, accurate near 0 (where ``log1p(-exp(x))`` is not).

    ``x`` is a log-probability, which rounding can bring to 0 (or a hair above it), where
    the value is -inf (or NaN): it is clamped to at most ``LOG_PROB_CEILING``, so the result
    is at least log(2^-23) = -15.9 and the gradient stays finite (0 through the clamp)."""
    x = xp.minimum(x, xp.zeros_like(x) + LOG_PROB_CEILING)
    return xp.log(-xp.expm1(x))


def stop_gradient(x: Array) -> Array:
    """``x`` with no gradient flowing back through it (identity on NumPy)."""
    if _is_mlx(x):
        return sys.modules["mlx.core"].stop_gradient(x)
    detach = getattr(x, "detach", None)  # torch
    return detach() if detach is not None else x


def to_float(x: Array) -> float:
    """A 0-d array of any namespace as a Python float (for logging, never inside a loss)."""
    item = getattr(x, "item", None)
    return float(item() if item is not None else x)
