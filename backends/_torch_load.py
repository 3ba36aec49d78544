"""Loading a causal LM for training with transformers and peft: device, dtype, LoRA, reference.

LoRA goes on every layer (peft's default) with scale alpha / r, the convention both backends
share (``backends.base.LoraSettings``); under LoRA the reference is the same model with its
adapter switched off, so no second model is held.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tabpo.common.errors import TabpoError
from tabpo.data.encoding import load_tokenizer
from tabpo.models.families import inspect_model_dir
from tabpo.training.backend import DTYPES, FINETUNE_MODES, LoraSettings, ModelOptions

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TabpoError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return _TORCH_DTYPES[name]


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else cuda, else mps, else cpu."""
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as e:
            raise TabpoError(f"unknown torch device {requested!r}: {e}") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``AutoModelForCausalLM`` from a checked directory (or a hub id), on ``device``."""
    from transformers import AutoModelForCausalLM

    inspect_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise TabpoError(f"cannot load a causal LM from {path}: {e}") from e
    return model.to(device)


# How each attention implementation takes the forked layout's (R, 1, L, L) mask: sdpa a
# boolean one (True = attend, 1 byte per entry), eager an additive one; the others
# (flash-attention, flex, paged) take no arbitrary mask, so the layout cannot fork there.
FORK_MASKS = {"sdpa": "bool", "eager": "additive"}


def fork_mask_kind(model: nn.Module, sharing: str) -> tuple[str, str | None]:
    """``sharing`` as the model allows it, and the kind of fork mask its attention takes."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    kind = FORK_MASKS.get(implementation)
    if kind is None and sharing == "on":
        raise TabpoError(
            f"--prefix-sharing on needs sdpa or eager attention; the model uses "
            f"{implementation!r} (use --prefix-sharing off or auto)"
        )
    return (sharing if kind else "off"), kind


def check_options(options: ModelOptions) -> None:
    if options.finetune not in FINETUNE_MODES:
        raise TabpoError(
            f"unknown finetune mode {options.finetune!r}; expected one of "
            f"{', '.join(FINETUNE_MODES)}"
        )
    if options.finetune == "lora" and options.ref_path:
        raise TabpoError(
            "ref_path is for full fine-tuning; under LoRA the reference is the model "
            "with its adapter switched off"
        )


def linear_names(model: nn.Module) -> set[str]:
    """Last name components of the model's ``nn.Linear`` modules (q_proj, lm_head, ...)."""
    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def check_lora_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """A target peft would silently skip (or fail on) is named here with the valid ones."""
    available = linear_names(model)
    for target in targets:
        if target not in available:
            raise TabpoError(
                f"LoRA target module '{target}' is not in the model "
                f"(its linear layers: {', '.join(sorted(available))})"
            )


def wrap_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """A peft model with LoRA on every layer's ``target_modules``; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, lora.target_modules)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def full_reference(
    options: ModelOptions, model: nn.Module, dtype: torch.dtype, device: torch.device
) -> nn.Module | None:
    """The frozen reference of full fine-tuning: the model at ``ref_path``, else a copy of
    the initial model when ``keep_reference``, else None (the reference must be precomputed)."""
    if options.ref_path:
        reference = load_causal_lm(options.ref_path, dtype, device)
        vocab, ref_vocab = (m.get_output_embeddings().weight.shape[0] for m in (model, reference))
        if vocab != ref_vocab:
            raise TabpoError(
                f"reference model {options.ref_path} has a vocabulary of {ref_vocab}, "
                f"the policy {vocab}"
            )
    elif options.keep_reference:
        reference = copy.deepcopy(model)
    else:
        return None
    return reference.requires_grad_(False).eval()


def tokenizer_for(path: str) -> Any:
    """The tokenizer saved next to the model, written with a full fine-tuned checkpoint."""
    if inspect_model_dir(path).is_local:
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TabpoError(f"cannot load a tokenizer for {path}: {e}") from e
