"""Loading a causal LM for training with transformers and peft: device, dtype, LoRA, reference.

LoRA goes on every layer (peft's default) with scale alpha / r, the convention both backends
share (``tabpo.training.backend.LoraSettings``); under LoRA the reference is the same model
with its adapter switched off, so no second model is held. The options were checked when
``ModelOptions`` was built.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tabpo.common.errors import TabpoError, reading
from tabpo.data.encoding import load_tokenizer
from tabpo.models.families import FAMILIES, inspect_model_dir
from tabpo.training import reference
from tabpo.training.backend import LoraSettings, ModelOptions

TORCH_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64,  # parity's reference computation (CPU)
}  # fmt: skip


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
    with reading(path, "a causal LM from it"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:  # a hub id is only inspected now that it is downloaded
        raise TabpoError(f"{path}: model_type {family!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")  # fmt: skip
    return model.to(device)


def checkpoint_layers(model: nn.Module) -> None:
    """transformers' own checkpointing of every decoder layer, non-reentrant (the frozen
    embeddings of LoRA then need no input gradients); transformers 5 names it activation
    checkpointing, earlier versions gradient checkpointing."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def linear_names(model: nn.Module) -> set[str]:
    """Last name components of the model's ``nn.Linear`` modules (q_proj, lm_head, ...)."""
    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def wrap_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """A peft model with LoRA on every layer's ``target_modules``; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    lora.check_targets(linear_names(model))
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
    """The frozen reference model of full fine-tuning, from where ``reference.source`` says
    (None: the reference log-probs must be precomputed)."""
    where = reference.source(options)
    if where == reference.SEPARATE:
        assert options.ref_path is not None
        ref = load_causal_lm(options.ref_path, dtype, device)
        vocab, ref_vocab = (m.get_output_embeddings().weight.shape[0] for m in (model, ref))
        reference.check_vocabularies(options.ref_path, vocab, ref_vocab)
    elif where == reference.INITIAL_COPY:
        ref = copy.deepcopy(model)
    else:
        return None
    return ref.requires_grad_(False).eval()


def tokenizer_for(path: str) -> Any:
    """The tokenizer saved next to the model, written with a full fine-tuned checkpoint."""
    if inspect_model_dir(path).is_local:
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    with reading(path, "a tokenizer from it"):
        return AutoTokenizer.from_pretrained(path)
