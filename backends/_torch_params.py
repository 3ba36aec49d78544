"""Trainable parameters under canonical names, and the files that hold them.

Canonical names are Hugging Face names without any wrapper (``tabpo.training.backend``): peft's
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` is
``model.layers.0.self_attn.q_proj.lora_A``; a full model's names are already canonical (a
tied ``lm_head.weight`` is the embedding, so it is not a parameter of its own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tabpo.backends._torch_dist import full_tensor, like
from tabpo.common.errors import TabpoError, reading
from tabpo.models.families import weight_files
from tabpo.training.backend import check_state

ADAPTER_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_name(peft_name: str) -> str:
    """peft's parameter or adapter-file key as a canonical LoRA name."""
    name = peft_name.removeprefix(_PEFT_PREFIX).replace(".default.", ".")
    return name.removesuffix(".weight")


def trainable(model: nn.Module, *, lora: bool) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates, by canonical name, in the model's order."""
    named = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return {(lora_name(n) if lora else n): p for n, p in named}


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A float32 NumPy copy of any floating tensor (NumPy has no bfloat16; float64 stays
    float64), gathered whole when it is sharded; a copy, since ``.numpy()`` of a CPU tensor
    would share the memory the optimizer updates."""
    whole = full_tensor(tensor.detach())
    dtype = torch.float64 if whole.dtype == torch.float64 else torch.float32
    return whole.to(device="cpu", dtype=dtype, copy=True).numpy()


def assign(params: dict[str, nn.Parameter], values: dict[str, Tensor], *, where: str) -> None:
    """Copy ``values`` into ``params``; every name must match, with the same shape."""
    check_state(
        {k: tuple(p.shape) for k, p in params.items()},
        {k: tuple(v.shape) for k, v in values.items()},
        where=where,
    )
    with torch.no_grad():
        for name, param in params.items():
            value = values[name].to(device=param.device, dtype=param.dtype)
            param.copy_(like(value, param))


def saved_weights(directory: Path, params: dict[str, nn.Parameter], *, lora: bool) -> dict:
    """The trainable tensors written by ``save_weights``, under canonical names.

    A full checkpoint may hold tensors that are not trainable parameters (a tied head
    written anyway); those are left out. A missing one is an error in ``assign``.
    """
    if lora:
        file = directory / ADAPTER_FILE
        if not file.is_file():
            raise TabpoError(f"{directory}: no {ADAPTER_FILE} to resume the adapter from")
        with reading(file, "the checkpoint's adapter"):
            return {lora_name(k): v for k, v in load_file(str(file)).items()}
    files = weight_files(directory)
    if not files:
        raise TabpoError(f"{directory}: no model*.safetensors to resume the weights from")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with reading(file, "the checkpoint's weights"):
            tensors.update(load_file(str(file)))
    return {k: v for k, v in tensors.items() if k in params}


def rng_state() -> dict:
    """Every generator dropout can draw from: CPU and, when present, CUDA or MPS."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    mps = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "mps": mps}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
