"""Full model directories: read and check one, write one in either stack's layout.

Reading checks everything a loader would trip on later, before a byte is written: the
family, every shard (present, listed by the index, not truncated), every tensor name and
shape against config.json (models/layout.py), ``lm_head.weight`` against
``tie_word_embeddings``, and MLX quantization (refused, or dequantized on request).

Writing copies tensor bytes unchanged unless asked to cast, one shard at a time, and names
shards ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` with a
transformers-style ``model.safetensors.index.json`` (mlx-lm reads any ``model*.safetensors``
and ignores the index). config.json always states ``tie_word_embeddings``; for mlx it also
gets the top-level ``rope_theta`` / ``rope_scaling`` mlx-lm's llama and qwen2 read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabpo.common.errors import TabpoError
from tabpo.common.files import STATE_FILE
from tabpo.models import quantized
from tabpo.models.families import ModelInfo, inspect_model_dir, weight_files
from tabpo.models.layout import IGNORED_SUFFIXES, check_layout
from tabpo.models.tensors import DTYPE_CODES, Header, Tensor, cast, read_header, read_tensors
from tabpo.models.tensors import write_file as write_safetensors

INDEX = "model.safetensors.index.json"
STACKS = ("torch", "mlx")
METADATA = {"torch": {"format": "pt"}, "mlx": {"format": "mlx"}}
# files of a model directory not copied as they are: weights, indexes, and what a tabpo
# training checkpoint keeps beside its weights (state, resolved config, RNG state)
_SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".index.json", ".yaml")
_SKIPPED_NAMES = ("config.json", "adapter_config.json", STATE_FILE, "rng_state.json")


@dataclass(frozen=True)
class SourceModel:
    """A checked model directory: its settings, shard headers, quantized modules."""

    info: ModelInfo
    headers: list[Header]
    quantized: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.info.path)

    def header_of(self, name: str) -> Header:
        return next(h for h in self.headers if name in h.entries)

    def has(self, name: str) -> bool:
        return any(name in h.entries for h in self.headers)

    def dtype_of(self, name: str) -> str:
        return self.header_of(name).entries[name]["dtype"]

    def read(self, name: str) -> Tensor:
        return read_tensors(self.header_of(name), [name])[name]


def shard_files(path: Path) -> list[Path]:
    """The shards the index lists (each must exist), else every ``model*.safetensors``."""
    index = path / INDEX
    if not index.is_file():
        return weight_files(path)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TabpoError(f"{index}: not a valid safetensors index ({exc})") from None
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise TabpoError(f"{index}: shard {file.name} is listed but missing")
    return files


def read_model(path: str | Path, *, dequantize: bool = False) -> SourceModel:
    """Check a local model directory of a supported family (see the module docstring)."""
    info = inspect_model_dir(path)
    if not info.is_local:
        raise TabpoError(f"{path}: not found (a local model directory is needed)")
    headers = [read_header(f) for f in shard_files(Path(path))]
    shapes: dict[str, tuple[int, ...]] = {}
    for header in headers:
        for name, entry in header.entries.items():
            if name in shapes:
                raise TabpoError(f"{header.path}: tensor {name} is also in another shard")
            shapes[name] = tuple(entry["shape"])
    _check_index(Path(path), headers)
    modules = quantized.quantized_modules(list(shapes))
    if modules and not dequantize:
        raise quantized.refusal(path, modules[0])
    for module in modules:
        bits = quantized.params_for(module, info.config)["bits"]
        shapes[f"{module}.weight"] = quantized.dense_shape(shapes[f"{module}.weight"], bits)
        for aux in quantized.AUX:
            shapes.pop(module + aux, None)
    shapes = {k: v for k, v in shapes.items() if not k.endswith(IGNORED_SUFFIXES)}
    check_layout(shapes, info.config, tied=info.tie_word_embeddings, where=str(path))
    source = SourceModel(info, headers, modules)
    if info.tie_word_embeddings and "lm_head.weight" in shapes:
        if source.read("lm_head.weight") != source.read("model.embed_tokens.weight"):
            raise TabpoError(
                f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight (set tie_word_embeddings to false in config.json)"
            )
    return source


def _check_index(path: Path, headers: list[Header]) -> None:
    index = path / INDEX
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for header in headers:
        for name in header.entries:
            if weight_map.get(name) != header.path.name:
                raise TabpoError(
                    f"{index}: tensor {name} is in {header.path.name}, the index "
                    f"says {weight_map.get(name)}"
                )
    stored = {name for header in headers for name in header.entries}
    for name in sorted(set(weight_map) - stored):
        raise TabpoError(f"{index}: lists tensor {name}, which no shard holds")


def output_names(source: SourceModel) -> list[list[str]]:
    """Per non-empty output shard, the tensor names it will hold (dense names)."""
    drop_head = source.info.tie_word_embeddings
    shards = []
    for header in source.headers:
        names = [
            n
            for n in header.entries
            if not n.endswith(IGNORED_SUFFIXES + quantized.AUX)
            and not (drop_head and n == "lm_head.weight")
        ]
        if names:
            shards.append(names)
    return shards


Update = Callable[[str, Tensor], Tensor]


def write_model(
    dst: Path, source: SourceModel, *, to: str, dtype: str | None, update: Update | None = None
) -> int:
    """Write ``source`` (each tensor passed through ``update``, then cast to ``dtype``) as a
    model directory for ``to`` into the existing directory ``dst``; returns the shard count."""
    shards = output_names(source)
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    names = ["model.safetensors"] if n == 1 else names
    weight_map, total = {}, 0
    for file_name, wanted in zip(names, shards, strict=True):
        header = source.header_of(wanted[0])
        raw = read_tensors(header)
        out = {}
        for name in wanted:
            module = name.removesuffix(".weight")
            if module in source.quantized and name.endswith(".weight"):
                parts = [f"{module}{s}" for s in (".weight", *quantized.AUX)]
                found = {p: source.read(p) for p in parts if source.has(p)}
                tensor = quantized.dequantize(module, found, source.info.config)
            else:
                tensor = raw[name]
            if update is not None:
                tensor = update(name, tensor)
            out[name] = cast(tensor, DTYPE_CODES[dtype], name=name) if dtype else tensor
            weight_map[name] = file_name
        total += write_safetensors(dst / file_name, out, METADATA[to])
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = target_config(source.info, to=to, dtype=dtype, dequantized=bool(source.quantized))
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(source.path, dst)
    return n


def target_config(info: ModelInfo, *, to: str, dtype: str | None, dequantized: bool) -> dict:
    """config.json for ``to``: explicit ``tie_word_embeddings``; for mlx, the top-level
    rope keys (``ModelInfo.mlx_overrides``); the new dtype; no quantization entry once
    dequantized."""
    config: dict[str, Any] = dict(info.config)
    config.update(info.mlx_overrides() if to == "mlx" else {})
    config["tie_word_embeddings"] = info.tie_word_embeddings
    if dequantized:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype:  # transformers 5 writes "dtype", older versions "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    return config


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, chat template, generation config...: every plain top-level file
    that is not a weight file, an index, a config or checkpoint state."""
    for item in sorted(src.iterdir()):
        name = item.name
        if item.is_file() and not name.startswith(".") and not name.endswith(_SKIPPED):
            if name not in _SKIPPED_NAMES:
                shutil.copyfile(item, dst / name)
