"""The names users bring from TRL and mlx-lm, mapped onto tabpo's options.

A TRL ``DPOConfig`` YAML or an ``mlx_lm.lora`` config mostly just works: keys and values
with the same meaning are renamed (``KEYS``, ``VALUES``), keys we know but do not support
are refused with the reason, one line each (``UNSUPPORTED``), and any other unknown key gets
a "did you mean". mlx-lm's flags that map cleanly are accepted on the command line too
(``FLAGS``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from tabpo.common.errors import TabpoError

KEYS = {
    # TRL (DPOConfig and the TrainingArguments it extends)
    "loss_type": "loss",
    "precompute_ref_log_probs": "precompute_ref",
    "output_dir": "output",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "resume_from_checkpoint": "resume",
    # mlx-lm (mlx_lm.lora)
    "iters": "max_steps",
    "adapter_path": "output",
    "max_seq_length": "max_length",
    "grad_checkpoint": "gradient_checkpointing",
    "steps_per_report": "logging_steps",
    "steps_per_eval": "eval_steps",
    "save_every": "save_steps",
    "fine_tune_type": "finetune",
}
# option -> {their value: ours}
VALUES = {
    "loss": {"sigmoid": "dpo"},
    "lr_scheduler": {"constant_with_warmup": "constant"},  # ours warms up, then holds
}
# mlx-lm's command-line spellings of the same options
FLAGS = {
    "max_steps": ("--iters",),
    "output": ("--adapter-path",),
    "max_length": ("--max-seq-length",),
    "logging_steps": ("--steps-per-report",),
    "eval_steps": ("--steps-per-eval",),
    "save_steps": ("--save-every",),
    "finetune": ("--fine-tune-type",),
    "gradient_checkpointing": ("--grad-checkpoint",),
}
_WEIGHTS = "tabpo loads the model itself: use dtype and device"
_STEPS = "tabpo counts steps: use eval_steps, save_steps and logging_steps"
_ADAM = "the optimizer is AdamW with torch's default betas and eps (weight_decay is an option)"
UNSUPPORTED = {
    "bf16": "there is no autocast; dtype: bfloat16 runs bf16 weights (float32 masters when "
    "fully fine-tuned)",
    "fp16": "there is no autocast; dtype: float16 runs float16 weights (float32 masters when "
    "fully fine-tuned)",
    "max_prompt_length": "prompts are cut from the left to fit max_length",
    "max_completion_length": "completions are never cut; a pair that does not fit is skipped",
    "truncation_mode": "prompts are cut from the left to fit max_length",
    "rpo_alpha": "use loss: rpo with alpha",
    "reference_free": "use a reference-free loss (simpo, orpo, sft)",
    "padding_free": "each pair runs as one forked sequence (prefix_sharing)",
    "use_logits_to_keep": "the LM head always runs on the completion positions only",
    "model_init_kwargs": _WEIGHTS,
    "ref_model_init_kwargs": _WEIGHTS,
    "torch_dtype": _WEIGHTS,
    "optim": _ADAM,
    "optimizer": _ADAM,
    "adam_beta1": _ADAM,
    "adam_beta2": _ADAM,
    "adam_epsilon": _ADAM,
    "eval_strategy": _STEPS,
    "save_strategy": _STEPS,
    "logging_strategy": _STEPS,
    "gradient_checkpointing_kwargs": "checkpointing is non-reentrant, per decoder layer",
    "logging_dir": "TensorBoard files go to the output directory's runs/",
    "push_to_hub": "tabpo writes to the output directory only",
    "hub_model_id": "tabpo writes to the output directory only",
    "sync_ref_model": "the reference stays fixed",
    "ref_adapter_name": "under LoRA the reference is the model with its adapter off",
    "force_use_ref_model": "under LoRA the reference is the model with its adapter off",
    "generate_during_eval": "use tabpo eval on the saved weights",
    "loss_weights": "one loss per run (loss)",
    "use_weighting": "TAB-PO's token weights are the loss tabpo",
    "ld_alpha": "not implemented",
    "f_divergence_type": "not implemented",
    "num_layers": "tabpo puts LoRA on every layer (mlx-lm's default is the last 16)",
    "lora_parameters": "use lora_rank, lora_alpha, lora_dropout, lora_target_modules",
    "mask_prompt": "the prompt is always masked",
    "train": "tabpo train always trains; data is the training file",
    "test": "use tabpo eval",
    "val_batches": "eval_data is evaluated whole",
    "test_batches": "use tabpo eval",
    "resume_adapter_file": "use resume with a checkpoint directory",
    "deepspeed": "multi-device training is not supported yet",
    "fsdp": "multi-device training is not supported yet",
    "torch_compile": "not supported",
}


def option(key: str, known: Iterable[str]) -> str:
    """The option a YAML key means (``known``: tabpo's option names), or a TabpoError saying
    why a known foreign key is unsupported or which name was probably meant."""
    key = key.replace("-", "_")
    name = KEYS.get(key, key)
    if name in known:
        return name
    if key in UNSUPPORTED:
        raise TabpoError(f"option '{key}' is not supported: {UNSUPPORTED[key]}")
    close = difflib.get_close_matches(key, [*known, *KEYS], n=1, cutoff=0.75)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TabpoError(f"unknown option '{key}'{hint}")


def value(name: str, given: object) -> object:
    """``given`` in tabpo's vocabulary (TRL's ``loss_type: sigmoid`` is ``dpo``)."""
    if isinstance(given, str):
        return VALUES.get(name, {}).get(given, given)
    return given
