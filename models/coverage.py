"""An adapter against its base model: does it fit, and which blocks does it cover.

mlx-lm adapts the same ``keys`` in each of the last ``num_layers`` blocks; PEFT adapts any
set of modules. Converting PEFT -> mlx-lm therefore covers blocks ``min(covered)`` .. last
and ZERO-FILLS every (block, key) pair PEFT did not adapt: B = 0 (and A = 0) adds nothing,
and for DoRA m = ||W||_row makes the layer the base layer again. This keeps non-suffix
layer sets (PEFT's ``layers_to_transform=[0]``) convertible, exactly, at the cost of a few
zero tensors; the number filled is reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.models.adapters import Adapter, Factors
from tabpo.models.model_dir import SourceModel
from tabpo.models.tensors import Tensor, from_float32, to_float32


def check_base(adapter: Adapter, base: SourceModel) -> None:
    """Every adapted module is a weight of ``base`` of shape (out, in), the shape the
    factors imply; mlx-lm's ``num_layers`` reaches every adapted block."""
    if base.quantized:
        raise TabpoError(
            f"{base.path}: a quantized base cannot be checked or verified; "
            "dequantize it first (tabpo convert --dequantize)"
        )
    where = f"adapter {adapter.path} does not match base {base.path}"
    for path, f in adapter.modules.items():
        name = f"{path}.weight"
        if not base.has(name):
            raise TabpoError(f"{where}: the base has no {name}")
        shape = tuple(base.header_of(name).entries[name]["shape"])
        implied = (f.b.shape[0], f.a.shape[1])
        if shape != implied:
            raise TabpoError(
                f"{where}: {name} has shape {shape}, the adapter's factors imply {implied}"
            )
    if adapter.num_layers is not None and adapter.num_layers > 0:
        first = base.info.num_layers - adapter.num_layers
        low = min(adapter.blocks())
        if low < first:
            raise TabpoError(
                f"{where}: it adapts block {low} but num_layers="
                f"{adapter.num_layers} covers only blocks {max(first, 0)}.."
            )


def fill_suffix(adapter: Adapter, base: SourceModel) -> tuple[Adapter, int]:
    """The adapter covering every (block, key) pair from its first adapted block to the
    last block of ``base`` (module docstring); returns it and how many pairs were filled."""
    blocks = adapter.blocks()
    keys = sorted(set().union(*blocks.values()))
    like = {k: next(f for p, f in adapter.modules.items() if p.endswith(f".{k}")) for k in keys}
    modules = dict(adapter.modules)
    filled = 0
    for layer in range(min(blocks), base.info.num_layers):
        for key in keys:
            path = f"model.layers.{layer}.{key}"
            if path in modules:
                continue
            f = like[key]
            m = _row_norms(base.read(f"{path}.weight"), f.m.dtype) if f.m is not None else None
            modules[path] = Factors(_zeros(f.a), _zeros(f.b), m)
            filled += 1
    return dataclasses.replace(adapter, modules=dict(sorted(modules.items()))), filled


def _zeros(like: Tensor) -> Tensor:
    return Tensor(like.dtype, like.shape, bytes(len(like.data)))


def _row_norms(weight: Tensor, dtype: str) -> Tensor:
    """||W||_row in float64, stored in ``dtype``: DoRA's magnitude at which it is the identity."""
    w = to_float32(weight).astype(np.float64)
    return from_float32(np.linalg.norm(w, axis=1).astype(np.float32), dtype)
