"""``tabpo merge``: fold a LoRA adapter into its base model and write a plain model directory.

For every adapted module (canonical orientation, models/adapters.py), in float64:

    W' = W + scale * B @ A                              (LoRA)
    W' = m / ||W + scale * B @ A||_row * (W + scale * B @ A)   (DoRA; bias unchanged)

then rounded once to the output dtype (``--dtype``, else the base weight's). Every other
tensor is copied byte for byte. The result is verified against base + adapter loaded in the
adapter's own stack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.common.files import write_dir
from tabpo.models.adapters import Adapter, read_mlx, read_peft
from tabpo.models.convert import (
    STACK_OF,
    Outcome,
    check_destination,
    check_options,
    detect,
)
from tabpo.models.coverage import check_base
from tabpo.models.model_dir import Update, read_model, write_model
from tabpo.models.tensors import DTYPE_CODES, Tensor, from_float32, to_float32
from tabpo.models.verify import TOLERANCES, Side, Verification, should_verify, verified, verify

_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def merged_weight(weight: Tensor, adapter: Adapter, module: str, dtype: str) -> Tensor:
    """The merged weight of ``module`` (module docstring), stored as ``dtype`` (a code)."""
    f = adapter.modules[module]
    w = to_float32(weight).astype(np.float64)
    merged = w + adapter.scale * (to_float32(f.b).astype(np.float64) @ to_float32(f.a))
    if f.m is not None:
        norms = np.linalg.norm(merged, axis=1, keepdims=True)  # (out, 1)
        merged = to_float32(f.m).astype(np.float64)[:, None] / norms * merged
    return from_float32(merged.astype(np.float32), dtype, name=module)


def merge_update(adapter: Adapter, dtype: str | None) -> Update:
    """The ``write_model`` hook that replaces each adapted weight by its merged value."""

    def update(name: str, tensor: Tensor) -> Tensor:
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in adapter.modules:
            return tensor
        return merged_weight(tensor, adapter, module, DTYPE_CODES[dtype] if dtype else tensor.dtype)

    return update


def merge(
    adapter_dir: Path,
    dst: Path,
    *,
    base: Path,
    to: str,
    dtype: str | None = None,
    force: bool = False,
    verify_result: bool | None = None,
    tolerance: float | None = None,
) -> Outcome:
    """Merge the adapter at ``adapter_dir`` into ``base``; write a full model for ``to``."""
    check_options(to, dtype)
    kind = detect(adapter_dir)
    if kind == "model":
        raise TabpoError(f"{adapter_dir} is a model directory, not a LoRA adapter")
    check_destination(dst, force=force, inputs=(adapter_dir, base))
    adapter = read_peft(adapter_dir) if kind == "peft" else read_mlx(adapter_dir)
    base_model = read_model(base)
    check_base(adapter, base_model)
    do_verify = should_verify(verify_result)
    first = next(iter(adapter.modules))
    rounded = dtype or _NAMES.get(base_model.dtype_of(f"{first}.weight"), "float32")
    tol = tolerance if tolerance is not None else TOLERANCES[rounded]
    checked: list[Verification] = []

    def fill(tmp: Path) -> None:
        write_model(tmp, base_model, to=to, dtype=dtype, update=merge_update(adapter, dtype))
        if do_verify:
            overrides = base_model.info.mlx_overrides()
            checked.append(
                verify(
                    Side(STACK_OF[kind], base, adapter_dir, overrides),
                    Side(to, tmp),
                    vocab=base_model.info.config["vocab_size"],
                    tolerance=tol,
                )
            )

    write_dir(dst, fill)
    detail = f"{len(adapter.modules)} modules into {base_model.info.family}"
    return Outcome(kind, "model", to, dst, detail, (), *verified(checked, verify_result))
