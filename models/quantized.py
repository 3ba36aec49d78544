"""MLX-quantized weights (``X.weight`` packed in uint32 + ``X.scales`` [+ ``X.biases``]).

transformers has no layer that reads them, so a conversion either refuses them or, with
``--dequantize``, rebuilds each dense weight with mlx's own ``mx.dequantize`` (the only
exact definition of the packing), in the dtype of its scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.models.tensors import STORAGE, Tensor

AUX = (".scales", ".biases")


def quantized_modules(names: list[str]) -> list[str]:
    """Module paths (``model.layers.0.mlp.up_proj``) whose weight is quantized."""
    return sorted(n.removesuffix(".scales") for n in names if n.endswith(".scales"))


def params_for(module: str, config: dict[str, Any]) -> dict[str, Any]:
    """group_size, bits and mode of one module: mlx-lm's per-path entry, else the default."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        raise TabpoError(
            f"config.json: {module} is quantized but there is no 'quantization' entry "
            "(group_size, bits) to dequantize it with"
        )
    own = q.get(module)
    base = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
    return {**base, **own} if isinstance(own, dict) else base


def dense_shape(packed: tuple[int, ...], bits: int) -> tuple[int, ...]:
    return (*packed[:-1], packed[-1] * 32 // bits)


def refusal(path: Any, module: str) -> TabpoError:
    return TabpoError(
        f"{path}: quantized MLX weights ({module}.scales) have no transformers equivalent; "
        "pass --dequantize to write dense weights (in the dtype of the scales), or convert "
        "the unquantized original model"
    )


def _to_mx(t: Tensor) -> Any:
    import mlx.core as mx

    x = mx.array(np.frombuffer(t.data, dtype=STORAGE[t.dtype]).reshape(t.shape))
    return x.view(mx.bfloat16) if t.dtype == "BF16" else x


def _from_mx(x: Any, dtype: str) -> Tensor:
    import mlx.core as mx

    bits = x.view(mx.uint16) if dtype == "BF16" else x
    return Tensor(dtype, tuple(x.shape), np.array(bits).astype(STORAGE[dtype]).tobytes())


def dequantize(module: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> Tensor:
    """The dense ``module.weight`` from its packed weight, scales and (affine) biases."""
    try:
        import mlx.core as mx
    except ImportError:
        raise TabpoError("--dequantize needs mlx installed (mlx's own dequantize)") from None
    p = params_for(module, config)
    scales = tensors[f"{module}.scales"]
    biases = tensors.get(f"{module}.biases")
    try:
        dense = mx.dequantize(
            _to_mx(tensors[f"{module}.weight"]),
            _to_mx(scales),
            _to_mx(biases) if biases is not None else None,
            group_size=p["group_size"],
            bits=p["bits"],
            mode=p["mode"],
        )
    except (ValueError, RuntimeError) as exc:
        raise TabpoError(f"{module}: cannot dequantize with {p}: {exc}") from None
    return _from_mx(dense, scales.dtype)
