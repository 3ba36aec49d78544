"""The model families both stacks support, and what a model directory must hold.

Both transformers and mlx-lm name the parameters of these families identically
(``model.layers.N.self_attn.q_proj.weight``...), so weights move between them unchanged.
Two config keys are read differently by the two stacks and are resolved here once
(docs/design.md, "Two stacks, one model"): ``tie_word_embeddings`` (mlx-lm defaults
to True, transformers to False) and ``rope_theta`` (transformers 5 nests it under
``rope_parameters``; mlx-lm's llama and qwen2 read only the top-level key).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabpo.common.errors import TabpoError
from tabpo.models.tensors import read_header

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# transformers' class defaults, used when config.json leaves a key out
_DEFAULT_ROPE_THETA = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelInfo:
    """What the loaders of both stacks must agree on about one model."""

    path: str
    family: str
    num_layers: int
    tie_word_embeddings: bool
    rope_theta: float
    config: dict[str, Any]
    is_local: bool = True

    @property
    def sliding_window(self) -> int | None:
        """The attention window of a config that uses one (mistral's ``sliding_window``;
        qwen's when ``use_sliding_window``), else None. mlx-lm ignores it."""
        window = self.config.get("sliding_window")
        if not window or (self.family != "mistral" and not self.config.get("use_sliding_window")):
            return None
        return int(window)

    def mlx_overrides(self) -> dict[str, Any]:
        """Config keys mlx-lm must be given explicitly to build the same function."""
        out: dict[str, Any] = {
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
        }
        rope = self.config.get("rope_parameters") or {}
        scaling = self.config.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            out["rope_scaling"] = scaling
        return out


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def inspect_model_dir(path: str | Path) -> ModelInfo:
    """Check a local Hugging Face model directory and resolve its cross-stack settings.

    A hub id ("org/name") that is not a local path is accepted as is, for the stack's own
    loader to download; anything else missing is an error.
    """
    name = str(path)
    path = Path(path)
    if not path.exists():
        if is_hub_id(name):
            return ModelInfo(name, "unknown", 0, False, 0.0, {}, is_local=False)
        raise TabpoError(f"model directory not found: {path} (and it is not a hub id)")
    if not path.is_dir():
        raise TabpoError(f"model path is not a directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TabpoError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise TabpoError(f"{config_file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    family = config.get("model_type")
    if family not in FAMILIES:
        raise TabpoError(
            f"{config_file}: model_type {family!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    weights = weight_files(path)
    if not weights:
        raise TabpoError(f"{path}: no model*.safetensors weight files")
    names = set(tensor_names(weights))
    tied = config.get("tie_word_embeddings")
    if tied is None:  # let the weights decide: a separate head means untied
        tied = "lm_head.weight" not in names
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", _DEFAULT_ROPE_THETA[family]))
    return ModelInfo(
        path=str(path),
        family=family,
        num_layers=int(config.get("num_hidden_layers", 0)),
        tie_word_embeddings=bool(tied),
        rope_theta=float(theta),
        config=config,
    )


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("model*.safetensors"))


def tensor_names(files: list[Path]) -> list[str]:
    """Tensor names from the safetensors headers (no tensor is read); a clear error if a
    file is truncated or not safetensors (``tensors.read_header``)."""
    return [name for file in files for name in read_header(file).entries]
