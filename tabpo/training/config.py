"""The training configuration: one dataclass, one source for defaults, YAML keys and flags.

YAML keys are the option names (``learning_rate`` or ``learning-rate``); a flag given on
the command line overrides the file, which overrides the defaults. TRL's names are used
where the meaning is the same, and TRL's and mlx-lm's other names for our options are
accepted (``tabpo.training.names``). Defaults follow the TAB-PO reference
implementation (docs/method.md §2): lr 2e-4, 3 epochs, batch 1 x 2 accumulation, warmup 10%,
linear decay, no clipping, LoRA r 16 / alpha 32 / dropout 0.05 on all projections.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tabpo import losses
from tabpo.common.errors import TabpoError
from tabpo.losses.weights import ALIGNMENTS, DEFAULT_FIELD_WEIGHTS, DIFF_FACTOR
from tabpo.training import names
from tabpo.training.backend import DTYPES, FINETUNE_MODES, LoraSettings, check_model_options
from tabpo.training.schedule import SCHEDULES

BACKENDS = ("auto", "mlx", "torch")
_LORA = LoraSettings()  # LoRA's defaults are the contract's
LOSS_HPARAMS = ("beta", "tau", "barrier_weight", "variant", "label_smoothing", "gamma", "lam",
                "alpha", "normalize")  # fmt: skip
REPORTERS = ("tensorboard", "wandb", "none")


def opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    # -- what to train
    model: str | None = opt(None, "Hugging Face model directory (or hub id).", "Model")
    data: str | None = opt(None, "Training pairs, JSONL (standard or conversational).", "Data")
    output: str | None = opt(None, "Output directory (refused if it exists).", "Output")
    backend: str = opt("auto", "mlx, torch, or auto (MLX on Apple silicon, else torch).", "Model")
    eval_data: str | None = opt(None, "Evaluation pairs, JSONL.", "Data")
    # -- the loss
    loss: str = opt("tabpo", "Loss name (see the README table).", "Loss")
    beta: float | None = opt(None, "beta (default: the loss's own).", "Loss")
    tau: float | None = opt(None, "TAB-PO barrier threshold (prob.).", "Loss")
    barrier_weight: float | None = opt(None, "TAB-PO barrier weight lambda.", "Loss")
    variant: str | None = opt(None, "tabpo: v1|v2; tdpo: tdpo1|tdpo2.", "Loss")
    label_smoothing: float | None = opt(None, "dpo / robust label smoothing.", "Loss")
    gamma: float | None = opt(None, "SimPO target margin.", "Loss")
    lam: float | None = opt(None, "DPOP / ORPO lambda.", "Loss")
    alpha: float | None = opt(None, "TDPO / RPO alpha.", "Loss")
    normalize: bool | None = opt(None, "IPO: length-normalised margin.", "Loss")
    # -- data and token weights
    max_length: int = opt(1024, "Prompt + completion tokens (prompt cut from the left).", "Data")
    field_weights: str = opt(
        ",".join(f"{k}={v}" for k, v in DEFAULT_FIELD_WEIGHTS.items()),
        "TAB-PO field -> weight map, e.g. 'Code=1.1,Sub-code=1.2'.",
        "Data",
    )
    diff_factor: float = opt(DIFF_FACTOR, "TAB-PO weight factor of differing tokens.", "Data")
    align: str = opt("edit", "Difference alignment: edit or position.", "Data")
    # -- model and fine-tuning
    dtype: str = opt("float32", f"{', '.join(DTYPES)}.", "Model")
    device: str | None = opt(None, "torch device (default cuda > mps > cpu).", "Model")
    finetune: str = opt("lora", " or ".join(FINETUNE_MODES) + ".", "Model")
    lora_rank: int = opt(_LORA.rank, "LoRA rank r.", "LoRA")
    lora_alpha: float = opt(_LORA.alpha, "LoRA alpha (scale = alpha / r on both backends).", "LoRA")
    lora_dropout: float = opt(_LORA.dropout, "LoRA dropout.", "LoRA")
    lora_target_modules: str = opt(
        ",".join(_LORA.target_modules),
        "LoRA target modules, comma-separated (every layer).",
        "LoRA",
    )
    ref_model: str | None = opt(None, "Full fine-tuning: reference model directory.", "Model")
    precompute_ref: bool | None = opt(
        None, "Precompute reference log-probs once (default: on where the loss allows).", "Model"
    )
    ref_cache_dir: str | None = opt(None, "Reference cache (default ~/.cache/tabpo/ref).", "Model")
    gradient_checkpointing: bool = opt(
        False,
        "Recompute each decoder layer's activations in the backward (less memory).",
        "Model",
    )
    prefix_sharing: str = opt(
        "auto",
        "One forward per pair, forked where chosen and rejected part: auto (when it saves "
        "work), on or off.",
        "Model",
    )
    # -- optimisation
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).", "Optimizer")
    epochs: float = opt(3.0, "Epochs (ignored when --max-steps is given).", "Optimizer")
    max_steps: int | None = opt(None, "Optimizer steps to run.", "Optimizer")
    batch_size: int = opt(1, "Pairs per micro-batch.", "Optimizer")
    gradient_accumulation_steps: int = opt(2, "Micro-batches per optimizer step.", "Optimizer")
    lr_scheduler: str = opt("linear", "linear, cosine or constant.", "Optimizer")
    warmup_ratio: float = opt(0.1, "Warmup as a fraction of all steps.", "Optimizer")
    warmup_steps: int | None = opt(None, "Warmup steps (overrides the ratio).", "Optimizer")
    weight_decay: float = opt(0.0, "AdamW weight decay.", "Optimizer")
    max_grad_norm: float | None = opt(None, "Clip the gradient norm (off by default).", "Optimizer")
    seed: int = opt(42, "Seed of data order, dropout and initialisation.", "Optimizer")
    # -- evaluation, logging, checkpoints
    eval_steps: int | None = opt(None, "Evaluate every N steps (and at the end).", "Output")
    eval_batch_size: int = opt(4, "Pairs per evaluation batch.", "Output")
    save_steps: int | None = opt(None, "Checkpoint every N steps (and at the end).", "Output")
    save_total_limit: int | None = opt(
        None, "Keep at most N checkpoints (the oldest are deleted).", "Output"
    )
    logging_steps: int = opt(1, "Log metrics every N steps.", "Output")
    report_to: str = opt(
        "none", "Also log to tensorboard, wandb (comma-separated) or none.", "Output"
    )
    resume: str | None = opt(None, "Continue from a checkpoint (or its output dir).", "Output")
    force: bool = opt(False, "Replace an existing output directory.", "Output")

    # ------------------------------------------------------------------------------------

    def loss_hparams(self) -> dict[str, Any]:
        """The loss hyperparameters that were set; an error for one the loss does not take."""
        given = {k: getattr(self, k) for k in LOSS_HPARAMS if getattr(self, k) is not None}
        spec = losses.get(self.loss)
        spec.check_hparams(given)
        return given

    def field_weight_map(self) -> dict[str, float]:
        return parse_mapping(self.field_weights, "field_weights")

    def target_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())

    def reporters(self) -> list[str]:
        """The loggers of --report-to besides metrics.jsonl ("none": no other)."""
        chosen = [r.strip() for r in self.report_to.split(",") if r.strip()]
        return [r for r in chosen if r != "none"]

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout,
                            self.target_modules())  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_mapping(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.rpartition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise TabpoError(f"{name}: expected 'Key=number' items, got {item!r}")
    return out


FIELDS = {f.name: f for f in fields(TrainConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML file, with one clear error naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TabpoError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TabpoError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(values, dict):
        raise TabpoError(f"{path}: a config file must be a mapping of option: value")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in getattr(root, "value", [])}
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{path}:{lines.get(str(key), '?')}"
        try:
            name = names.option(str(key), [f for f in FIELDS if f != "force"])
        except TabpoError as exc:
            raise TabpoError(f"{where}: {exc}") from None
        if name == "resume" and isinstance(value, bool):  # TRL: true = the newest checkpoint
            out[name] = value or None
            continue
        out[name] = coerce(name, names.value(name, value), where)
    return out


def coerce(name: str, value: Any, where: str) -> Any:
    """A YAML value as the option's type (lists and mappings become the flag's text form)."""
    if value is None:
        return None
    if name == "field_weights" and isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if name in ("lora_target_modules", "report_to") and isinstance(value, list):
        return ",".join(map(str, value))
    kind = FIELDS[name].type
    try:
        if "bool" in kind:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if "float" in kind:
            return float(value)
        if "int" in kind:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
    except (TypeError, ValueError):
        raise TabpoError(f"{where}: option '{name}' expects {kind}, got {value!r}") from None
    return str(value)


def build(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then flags (None means "not given")."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    if merged.get("resume") is True:  # resume_from_checkpoint: true, TRL's newest checkpoint
        merged["resume"] = merged.get("output")
    config = TrainConfig(**merged)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Contradictions and out-of-range values, one clear line each."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TabpoError(message)

    for name in ("model", "data", "output"):
        need(getattr(c, name) is not None, f"--{name} is required")
    need(c.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}")
    need(c.align in ALIGNMENTS, f"--align must be one of {', '.join(ALIGNMENTS)}")
    check_model_options(dtype=c.dtype, finetune=c.finetune, prefix_sharing=c.prefix_sharing,
                        ref_path=c.ref_model)  # fmt: skip
    need(c.lr_scheduler in SCHEDULES, f"--lr-scheduler must be one of {', '.join(SCHEDULES)}")
    for reporter in c.reporters():
        need(reporter in REPORTERS, f"--report-to: unknown {reporter!r} (choose from "
             f"{', '.join(REPORTERS)}, comma-separated)")  # fmt: skip
    c.loss_hparams()  # unknown loss or a hyperparameter it does not take
    c.field_weight_map()
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "lora_rank",
                 "eval_batch_size", "logging_steps"):  # fmt: skip
        need(getattr(c, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
        value = getattr(c, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1")
    need(c.learning_rate >= 0 and math.isfinite(c.learning_rate), "--learning-rate must be >= 0")
    need(c.epochs > 0, "--epochs must be positive")
    need(0 <= c.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
    need(0 <= c.warmup_ratio <= 1, "--warmup-ratio must be in [0, 1]")
    need(c.max_grad_norm is None or c.max_grad_norm > 0, "--max-grad-norm must be positive")
    need(bool(c.target_modules()), "--lora-target-modules is empty")
    need(not (c.resume and c.force), "--resume and --force contradict each other")
    spec = losses.get(c.loss)
    if c.precompute_ref:
        need(not spec.needs_kl, f"--precompute-ref cannot serve loss '{c.loss}': it needs the "
             "full-vocabulary KL to the reference at every step")  # fmt: skip
        need(not spec.reference_free, f"--precompute-ref: loss '{c.loss}' uses no reference")


def use_precomputed_reference(c: TrainConfig) -> bool:
    """--precompute-ref as given, else on wherever the loss allows it."""
    spec = losses.get(c.loss)
    if c.precompute_ref is not None:
        return c.precompute_ref
    return not spec.reference_free and not spec.needs_kl


def to_yaml(c: TrainConfig) -> str:
    values = {k: v for k, v in c.to_dict().items() if k not in ("resume", "force")}
    return yaml.safe_dump(values, sort_keys=False)
