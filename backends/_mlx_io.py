"""Files the MLX backend writes: mlx-lm adapters, HF model directories, optimizer and RNG state.

- LoRA: ``adapters.safetensors`` + ``adapter_config.json``, what ``mlx_lm.load(base,
  adapter_path=...)`` reads (``fine_tune_type``, ``num_layers``, ``lora_parameters``).
- Full: a Hugging Face directory whose config.json carries ``tie_word_embeddings`` and
  ``rope_theta`` at the top level, so mlx-lm needs no overrides to rebuild the same model.
- Resume: ``optimizer.safetensors`` (AdamW moments, ``step``, ``learning_rate``) and
  ``rng_state.json`` (the global MLX key that draws LoRA dropout masks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from tabpo.common.errors import TabpoError, reading
from tabpo.models.families import ModelInfo

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
RNG_STATE = "rng_state.json"
MASTER_WEIGHTS = "master_weights.safetensors"
_METADATA = {"format": "mlx"}


def save_adapter(model: nn.Module, directory: Path, lora_parameters: dict[str, Any]) -> None:
    """The LoRA factors under mlx-lm's names and the config its ``load_adapters`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(directory / ADAPTER_WEIGHTS), weights, metadata=_METADATA)
    config = {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers),
        "lora_parameters": lora_parameters,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_model_dir(model: nn.Module, info: ModelInfo, tokenizer: Any, directory: Path) -> None:
    """The whole model as a Hugging Face directory (HF names, tokenizer, explicit config)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / MODEL_WEIGHTS), weights, metadata=_METADATA)
    config = {**info.config, **info.mlx_overrides()}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(directory))
    generation = Path(info.path) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, directory / "generation_config.json")


def read_weights(model: nn.Module, directory: Path, *, lora: bool) -> list[tuple[str, mx.array]]:
    """The trainable weights ``save_adapter`` / ``save_model_dir`` wrote, checked against the
    model's trainable parameters (names and shapes)."""
    file = directory / (ADAPTER_WEIGHTS if lora else MODEL_WEIGHTS)
    if not file.is_file():
        raise TabpoError(f"{directory}: no {file.name} (was save_weights called there?)")
    with reading(file, "the checkpoint's weights"):
        saved = mx.load(str(file))
    current = dict(tree_flatten(model.trainable_parameters()))
    missing, unknown = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unknown:
        raise TabpoError(
            f"{file}: weights do not match the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    for name, value in saved.items():
        if value.shape != current[name].shape:
            raise TabpoError(
                f"{file}: {name} has shape {tuple(value.shape)}, "
                f"the model's is {tuple(current[name].shape)}"
            )
    return [(name, value.astype(current[name].dtype)) for name, value in saved.items()]


def save_optimizer(optimizer: optim.Optimizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(directory / OPTIMIZER_STATE), state, metadata=_METADATA)


def load_optimizer(optimizer: optim.Optimizer, directory: Path) -> None:
    file = directory / OPTIMIZER_STATE
    if not file.is_file():
        raise TabpoError(f"{directory}: no {OPTIMIZER_STATE} (was save_state called there?)")
    with reading(file, "the optimizer state"):
        optimizer.state = tree_unflatten(list(mx.load(str(file)).items()))


def save_master(master: Any, directory: Path) -> None:
    """The float32 master weights of half-precision training, exactly."""
    state = dict(tree_flatten(master))
    mx.save_safetensors(str(directory / MASTER_WEIGHTS), state, metadata=_METADATA)


def load_master(directory: Path) -> list[tuple[str, mx.array]] | None:
    file = directory / MASTER_WEIGHTS
    if not file.is_file():
        return None
    with reading(file, "the float32 master weights"):
        return list(mx.load(str(file)).items())


def save_rng(directory: Path) -> None:
    key = [int(v) for v in mx.random.state[0].tolist()]
    (directory / RNG_STATE).write_text(json.dumps({"key": key}) + "\n")


def load_rng(directory: Path) -> None:
    """Restore the global key: ``mx.random.seed(s)`` sets it to ``[s >> 32, s & 0xffffffff]``,
    so any saved key (two uint32) is reached by seeding with the 64-bit number it spells."""
    file = directory / RNG_STATE
    if not file.is_file():
        raise TabpoError(f"{directory}: no {RNG_STATE} (was save_state called there?)")
    with reading(file, "the RNG state"):
        hi, lo = (int(v) for v in json.loads(file.read_text())["key"])
    mx.random.seed((hi << 32) | lo)
    if [int(v) for v in mx.random.state[0].tolist()] != [hi, lo]:
        raise TabpoError("this MLX version seeds its RNG differently: cannot restore its state")
