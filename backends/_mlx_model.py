"""Loading an mlx-lm model the way transformers reads the same directory, and LoRA on it.

mlx-lm is always given ``ModelInfo.mlx_overrides()``: without them it reads a config written
by transformers 5 with its own defaults for ``rope_theta`` and ``tie_word_embeddings`` and
builds a different function (docs/design.md, "Two stacks, one model").

Canonical names (tabpo/training/backend.py): mlx-lm stores LoRA factors as ``lora_a`` (in, r) and
``lora_b`` (r, out); the canonical ``lora_A`` (r, in) and ``lora_B`` (out, r) are their
transposes. Every other name is already Hugging Face's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _download
from mlx_lm.utils import load as mlx_lm_load

from tabpo.common.errors import TabpoError, reading
from tabpo.models.families import ModelInfo, inspect_model_dir, tensor_names, weight_files
from tabpo.training.backend import LoraSettings, check_state

MX_DTYPES = {
    "float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16,
    "float64": mx.float64,  # parity's reference computation (CPU only)
}  # fmt: skip
_TO_CANONICAL = {"lora_a": "lora_A", "lora_b": "lora_B"}


def resolve(path: str) -> ModelInfo:
    """The checked ModelInfo of a local directory, or of a hub id once mlx-lm fetched it.

    A hub id has no config to inspect until it is on disk, and its placeholder ModelInfo
    would give wrong overrides, so it is downloaded (by mlx-lm, as its own loader would) first.
    """
    info = inspect_model_dir(path)
    if not info.is_local:
        info = inspect_model_dir(_download(path))  # mlx-lm's own hub fetch (private API)
    quantized = [n for n in tensor_names(weight_files(Path(info.path))) if n.endswith(".scales")]
    if quantized:
        raise TabpoError(
            f"{info.path}: quantized MLX weights ({quantized[0]}...) cannot be trained or "
            "converted; start from the unquantized model"
        )
    return info


def load_model(info: ModelInfo, dtype: str) -> tuple[nn.Module, Any]:
    """The mlx-lm model of ``info`` cast to ``dtype`` (one of ``DTYPES``), in eval mode, and
    its HF tokenizer."""
    with reading(info.path, "this model with mlx-lm"):
        model, wrapper = mlx_lm_load(info.path, model_config=info.mlx_overrides())
    model.set_dtype(MX_DTYPES[dtype])
    mx.eval(model.parameters())
    return model, wrapper._tokenizer


def lora_keys(model: nn.Module, lora: LoraSettings) -> list[str]:
    """Within-layer paths (``self_attn.q_proj``...) of the linear layers LoRA targets."""
    linear = [k for k, m in model.layers[0].named_modules() if isinstance(m, nn.Linear)]
    lora.check_targets({k.rsplit(".", 1)[-1] for k in linear})
    return [k for k in linear if k.rsplit(".", 1)[-1] in lora.target_modules]


def lora_parameters(model: nn.Module, lora: LoraSettings) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters`` for these settings (the ``scale`` is alpha / r)."""
    keys = lora_keys(model, lora)
    return {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": keys}


def apply_lora(model: nn.Module, lora: LoraSettings) -> dict[str, Any]:
    """Freeze the model and wrap the target projections of EVERY layer (mlx-lm's default is
    the last 16); returns the ``lora_parameters`` written to adapter_config.json."""
    params = lora_parameters(model, lora)
    model.freeze()
    linear_to_lora_layers(model, num_layers=len(model.layers), config=params)
    mx.eval(model.parameters())
    return params


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward (``mx.checkpoint``), as
    mlx-lm's ``--grad-checkpoint`` does, but per instance: each layer becomes an instance of
    a subclass whose call is checkpointed, so other models of the class are untouched and
    parameter names do not change."""
    for layer in model.model.layers:
        layer.__class__ = _checkpointed(type(layer))


@functools.cache
def _checkpointed(base: type) -> type:
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # arrays go through the checkpoint; anything else (a cache, a mask name) is closed over
        at = [i for i, a in enumerate(args) if isinstance(a, mx.array)]
        # the forked forward swaps each layer's RoPE for the forward's duration
        # (_mlx_logps._positioned_rope); the recomputation runs in the backward, after the
        # swap is undone, so it reinstalls the RoPE this call saw
        rope = self.self_attn.rope

        def inner(params: Any, *arrays: mx.array) -> Any:
            self.update(params)
            full = list(args)
            for i, a in zip(at, arrays, strict=True):
                full[i] = a
            current, self.self_attn.rope = self.self_attn.rope, rope
            try:
                return base.__call__(self, *full, **kwargs)
            finally:
                self.self_attn.rope = current

        return mx.checkpoint(inner)(self.trainable_parameters(), *(args[i] for i in at))

    return type(base.__name__, (base,), {"__call__": __call__, "checkpointed": True})


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The base model for the duration: every LoRA scale 0 and eval mode (no dropout draws).
    The graph of an array built inside holds the 0, so it may be evaluated after the exit."""
    modules = lora_modules(model)
    scales = [m.scale for m in modules]
    training = model.training
    try:
        for m in modules:
            m.scale = 0.0
        model.eval()
        yield
    finally:
        for m, s in zip(modules, scales, strict=True):
            m.scale = s
        model.train(training)


def to_numpy(x: mx.array) -> np.ndarray:
    """float32 NumPy (bf16 has no NumPy dtype; float64 stays float64)."""
    return np.array(widened(x))


def widened(x: mx.array) -> mx.array:
    """``x`` in float32, or float64 if it is float64 (parity's reference computation)."""
    return x if x.dtype == mx.float64 else x.astype(mx.float32)


def canonical(tree: Any) -> dict[str, np.ndarray]:
    """A tree of trainable arrays (parameters or gradients) under canonical names, float32
    (float64 in a float64 model)."""
    out = {}
    for name, x in tree_flatten(tree):
        stem, leaf = name.rsplit(".", 1)
        if leaf in _TO_CANONICAL:
            out[f"{stem}.{_TO_CANONICAL[leaf]}"] = to_numpy(x.T)
        else:
            out[name] = to_numpy(x)
    return out


def from_canonical(model: nn.Module, state: dict[str, np.ndarray]) -> Any:
    """The trainable-parameter tree of ``model`` holding ``state`` (canonical names), cast to
    each parameter's dtype; a TabpoError names any missing or unknown key or bad shape."""
    current = dict(tree_flatten(model.trainable_parameters()))
    wanted = {}
    for name in current:
        stem, leaf = name.rsplit(".", 1)
        wanted[f"{stem}.{_TO_CANONICAL.get(leaf, leaf)}"] = name
    transposed = {n: n.rsplit(".", 1)[-1] in _TO_CANONICAL for n in current}
    check_state(
        {k: tuple(current[n].shape)[:: -1 if transposed[n] else 1] for k, n in wanted.items()},
        {k: tuple(np.shape(v)) for k, v in state.items()},
        where="load_trainable_state",
    )
    arrays = []
    for key, name in wanted.items():
        value = np.asarray(state[key])
        value = value.T if transposed[name] else value
        arrays.append((name, mx.array(value).astype(current[name].dtype)))
    return tree_unflatten(arrays)
