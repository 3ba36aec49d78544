"""LoRA adapters in PEFT's and mlx-lm's formats, read into one canonical form and written back.

    PEFT    adapter_model.safetensors  base_model.model.<path>.lora_A.weight (r, in)
                                       base_model.model.<path>.lora_B.weight (out, r)
                                       base_model.model.<path>.lora_magnitude_vector (out,)
            adapter_config.json        r, lora_alpha, use_rslora, target_modules, ...
    mlx-lm  adapters.safetensors       <path>.lora_a (in, r), <path>.lora_b (r, out), <path>.m
            adapter_config.json        fine_tune_type, num_layers, lora_parameters{rank, scale,
                                       dropout, keys}

Canonical: ``<path>`` -> A (r, in), B (out, r), m (out,), and one scale, so that the
adapted weight is ``W + scale * B @ A`` in both (PEFT: scale = alpha / r, rsLoRA alpha /
sqrt r; mlx-lm: its literal ``scale``). DoRA is the same function in both libraries (peft
``tuners/lora/dora.py``, mlx-lm ``tuner/dora.py``): ``m / ||W'||_row * (x W'^T)`` plus the
base bias, W' the adapted weight, norms over the input axis (one per output row), m stored
as is, so the magnitude vector converts unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tabpo.common.errors import TabpoError
from tabpo.models.tensors import (
    Header,
    Tensor,
    cast,
    read_header,
    read_tensors,
    to_float32,
    transpose,
    write_file,
)

PEFT_WEIGHTS, MLX_WEIGHTS = "adapter_model.safetensors", "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_PEFT_LEAVES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}
_MLX_LEAVES = {".lora_a": "a", ".lora_b": "b", ".m": "m"}
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# PEFT options whose tensors or behaviour mlx-lm adapters cannot express
_PEFT_UNSUPPORTED = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "full copies of modules_to_save",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out weights",
    "lora_bias": "LoRA bias vectors (lora_bias)",
}


@dataclass(frozen=True)
class Factors:
    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    m: Tensor | None = None  # (out,) DoRA magnitude


@dataclass(frozen=True)
class Adapter:
    """An adapter in canonical form (module docstring), whichever file it came from."""

    path: Path
    fmt: str  # "peft" or "mlx"
    modules: dict[str, Factors]
    rank: int
    scale: float
    dropout: float
    dora: bool
    num_layers: int | None = None  # mlx-lm: how many blocks, counted from the last
    base_name: str | None = None  # PEFT: base_model_name_or_path (informational)

    def blocks(self) -> dict[int, set[str]]:
        """Block index -> adapted module paths inside it (``self_attn.q_proj``); a
        TabpoError for a module outside the decoder blocks."""
        out: dict[int, set[str]] = {}
        for path in self.modules:
            match = _BLOCK.match(path)
            if not match:
                raise TabpoError(
                    f"{self.path}: {path} is outside the decoder blocks "
                    "(model.layers.N); mlx-lm adapters cannot hold it"
                )
            out.setdefault(int(match.group(1)), set()).add(match.group(2))
        return out


def _config(path: Path) -> dict[str, Any]:
    file = path / CONFIG
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise TabpoError(f"{path}: no {CONFIG}") from None
    except json.JSONDecodeError as exc:
        raise TabpoError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def _group(header: Header, leaves: dict[str, str], prefix: str) -> dict[str, dict[str, Tensor]]:
    """module path -> {"a", "b", "m"} tensors; a TabpoError names any other key."""
    out: dict[str, dict[str, Tensor]] = {}
    tensors = read_tensors(header)
    for key, tensor in tensors.items():
        leaf = next((s for s in leaves if key.endswith(s)), None)
        if leaf is None or not key.startswith(prefix):
            raise TabpoError(f"{header.path}: unexpected tensor {key} (not a LoRA factor)")
        out.setdefault(key[len(prefix) : -len(leaf)], {})[leaves[leaf]] = tensor
    return out


def _factors(path: Path, grouped: dict[str, dict[str, Tensor]], rank: int, dora: bool):
    """Canonical factors, checked: both factors, rank r, matching shapes, m iff DoRA."""
    out = {}
    for module, parts in sorted(grouped.items()):
        if "a" not in parts or "b" not in parts:
            raise TabpoError(f"{path}: {module} has only one of its two LoRA factors")
        a, b, m = parts["a"], parts["b"], parts.get("m")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise TabpoError(
                f"{path}: {module}: factor shapes A {a.shape}, B {b.shape} do not "
                f"have rank {rank} (A (r, in), B (out, r))"
            )
        if dora != (m is not None) or (m is not None and m.shape != (b.shape[0],)):
            what = "a DoRA magnitude of shape (out,)" if dora else "no DoRA magnitude"
            raise TabpoError(f"{path}: {module}: expected {what}")
        out[module] = Factors(a, b, m)
    if not out:
        raise TabpoError(f"{path}: the adapter holds no LoRA factors")
    return out


def read_peft(path: Path) -> Adapter:
    config = _config(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise TabpoError(f"{path / CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _PEFT_UNSUPPORTED.items():
        if config.get(key):
            raise TabpoError(
                f"{path / CONFIG}: {what} cannot be converted (set {key}: {config[key]!r})"
            )
    if config.get("bias", "none") != "none":
        raise TabpoError(
            f"{path / CONFIG}: bias={config['bias']!r}: trained biases cannot be "
            "converted (only bias='none')"
        )
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise TabpoError(f"{path / CONFIG}: needs numeric 'r' and 'lora_alpha'") from None
    dora = bool(config.get("use_dora"))
    grouped = _group(read_header(path / PEFT_WEIGHTS), _PEFT_LEAVES, PEFT_PREFIX)
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return Adapter(
        path,
        "peft",
        _factors(path / PEFT_WEIGHTS, grouped, rank, dora),
        rank,
        scale,
        float(config.get("lora_dropout") or 0.0),
        dora,
        base_name=config.get("base_model_name_or_path"),
    )


def read_mlx(path: Path) -> Adapter:
    config = _config(path)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise TabpoError(
            f"{path / CONFIG}: fine_tune_type {kind!r} is not a LoRA adapter (its "
            f"{MLX_WEIGHTS} holds full weights: mlx_lm.fuse writes them as a model directory)"
        )
    params = config.get("lora_parameters") or {}
    try:
        rank, scale = int(params["rank"]), float(params["scale"])
    except (KeyError, TypeError, ValueError):
        raise TabpoError(f"{path / CONFIG}: lora_parameters needs 'rank' and 'scale'") from None
    grouped = _group(read_header(path / MLX_WEIGHTS), _MLX_LEAVES, "")
    for parts in grouped.values():  # mlx-lm stores x @ a @ b: a (in, r), b (r, out)
        for leaf in ("a", "b"):
            if leaf in parts and len(parts[leaf].shape) == 2:
                parts[leaf] = transpose(parts[leaf])
    modules = _factors(path / MLX_WEIGHTS, grouped, rank, kind == "dora")
    adapter = Adapter(
        path,
        "mlx",
        modules,
        rank,
        scale,
        float(params.get("dropout") or 0.0),
        kind == "dora",
        num_layers=config.get("num_layers"),
    )
    adapter.blocks()  # mlx-lm only adapts blocks; anything else is not an mlx-lm adapter
    return adapter


def write_peft(dst: Path, adapter: Adapter, *, base: str | None, base_layers: int | None) -> None:
    """PEFT files: r = rank, lora_alpha = scale * rank (not rsLoRA), target_modules the module
    names, layers_to_transform the covered blocks (None when all ``base_layers`` are)."""
    tensors = {}
    for path, f in adapter.modules.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = f.a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = f.b
        if f.m is not None:
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = f.m
    write_file(dst / PEFT_WEIGHTS, tensors, {"format": "pt"})
    blocks = adapter.blocks()
    layers = sorted(blocks)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": adapter.rank,
        "lora_alpha": adapter.scale * adapter.rank,
        "use_rslora": False,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for s in blocks.values() for p in s}),
        "layers_to_transform": None if layers == list(range(base_layers or -1)) else layers,
        "layers_pattern": None,
        "use_dora": adapter.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (dst / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_mlx(dst: Path, adapter: Adapter, *, base_layers: int) -> None:
    """mlx-lm files covering the blocks from the first adapted one to the last of the base's
    ``base_layers``; ``adapter`` must hold every (block, key) pair of that range
    (``coverage.fill_suffix``), as mlx-lm wraps them all."""
    blocks = adapter.blocks()
    keys = sorted(set().union(*blocks.values()))
    tensors = {}
    for path, f in adapter.modules.items():
        tensors[f"{path}.lora_a"] = transpose(f.a)
        tensors[f"{path}.lora_b"] = transpose(f.b)
        if f.m is not None:
            tensors[f"{path}.m"] = f.m
    write_file(dst / MLX_WEIGHTS, tensors, {"format": "mlx"})
    config = {
        "fine_tune_type": "dora" if adapter.dora else "lora",
        "num_layers": base_layers - min(blocks),
        "lora_parameters": {
            "rank": adapter.rank,
            "scale": adapter.scale,
            "dropout": adapter.dropout,
            "keys": keys,
        },
    }
    (dst / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def cast_adapter(adapter: Adapter, dtype: str) -> Adapter:
    """Every factor (and magnitude) cast to the safetensors dtype code ``dtype``."""
    modules = {
        p: Factors(
            cast(f.a, dtype, name=p),
            cast(f.b, dtype, name=p),
            None if f.m is None else cast(f.m, dtype, name=p),
        )  # fmt: skip
        for p, f in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)


def read_adapter(path: Path) -> Adapter:
    """A PEFT or mlx-lm adapter directory, whichever its weight file says it is."""
    if (path / PEFT_WEIGHTS).is_file():
        return read_peft(path)
    if (path / MLX_WEIGHTS).is_file():
        return read_mlx(path)
    raise TabpoError(f"{path}: neither {PEFT_WEIGHTS} nor {MLX_WEIGHTS} (not a LoRA adapter)")


def read_canonical(path: Path) -> dict[str, np.ndarray]:
    """The factors of a PEFT or mlx-lm adapter under the backends' canonical names
    (``<path>.lora_A`` (r, in), ``<path>.lora_B`` (out, r), tabpo/training/backend.py), float32.
    The scale is not part of this state: the backend's LoraSettings must match it."""
    adapter = read_adapter(Path(path))
    if adapter.dora:
        raise TabpoError(f"{path}: a DoRA adapter has no LoRA-only backend state")
    out = {}
    for module, f in adapter.modules.items():
        out[f"{module}.lora_A"] = to_float32(f.a)
        out[f"{module}.lora_B"] = to_float32(f.b)
    return out
