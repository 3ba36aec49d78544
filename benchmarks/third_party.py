"""Competitor runners for the performance benchmark: TRL's ``DPOTrainer`` and mlx-lm-lora's DPO.

Each runner trains on the benchmark fixture (``benchmarks/fixture.py``) with the settings our
trainer is timed with, and is meant to run in a fresh subprocess:

    LoRA r 16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down; DPO sigmoid loss, beta 0.1;
    AdamW (no weight decay), constant lr 1e-5, no warmup, no clipping, no accumulation;
    float32; ``batch_size`` pairs per optimizer step; no truncation.

The token sequences are ours: prompt = BOS + prompt words, completion = completion words + EOS.
Each tool builds them from text its own way, so the text handed to it is adapted (see
``_trl_rows`` and ``_MLX_CHAT_TEMPLATE``) and every runner checks the ids it will train on
against ``_our_ids`` before it takes a step.

    python -m benchmarks.third_party trl --fixture DIR --mode gc_off --steps 5 --warmup 2 \
        --batch-size 8
    python -m benchmarks.third_party mlx --fixture DIR --steps 5 --warmup 2 --batch-size 8
    python -m benchmarks.third_party trl-loss --fixture DIR [--adapter DIR] --batch-size 8

print one JSON line (the result dict, or ``{"loss": ...}``); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LORA_RANK = 16
LORA_ALPHA = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
LEARNING_RATE = 1e-5
MAX_LENGTH = 4096  # above prompt + completion for every fixture: nothing is truncated
TRL_MODES = ("gc_off", "gc_on", "precompute")

# mlx-lm-lora always renders pairs through the tokenizer's chat template (its ``DPODataset``),
# and installs a generic "user: ...\nassistant: ..." template when the tokenizer has none. This
# template renders our sequences instead: BOS, the prompt words, then the completion words and
# EOS. It is tokenized without special tokens, so the BOS comes from the template alone, and the
# spaces keep the whitespace-split words apart. The prompt alone (add_generation_prompt) renders
# as BOS + prompt, which is the prompt-length mlx-lm-lora masks out of the loss.
_MLX_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
    "{% else %} {{ m['content'] }}{% endif %}{% endfor %}"
)


# ---- shared helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send stdout to stderr and silence progress bars and library logging.

    The orchestrator reads one JSON line from stdout, and both tools print (banners, tqdm.write,
    the Trainer's log lines), so the whole run happens inside this.
    """
    os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute loop reads this
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # transformers 5 deprecates the `gradient_checkpointing` name that TRL still uses
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _read_pairs(fixture: Path, at_least: int = 0) -> list[dict[str, str]]:
    """The fixture's pairs in file order, repeated whole if there are fewer than ``at_least``
    (so that one batch can always be filled)."""
    with (fixture / "pairs.jsonl").open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"no pairs in {fixture / 'pairs.jsonl'}")
    while len(rows) < at_least:
        rows = rows + rows
    return rows


def _our_ids(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], list[int], list[int]]:
    """Our trainer's tokenization of a pair: (prompt_ids, chosen_ids, rejected_ids), where the
    prompt gets the tokenizer's BOS and each completion ends with EOS."""
    prompt = list(tokenizer(row["prompt"])["input_ids"])
    eos = [tokenizer.eos_token_id]
    chosen = list(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) + eos
    rejected = list(tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]) + eos
    return prompt, chosen, rejected


def _peak_memory_gb(cuda: bool = False) -> float:
    """Peak CUDA memory allocated when training ran on CUDA, else the process's peak RSS."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


# ---- TRL --------------------------------------------------------------------------------------


def _templated_ids(tokenizer: Any, rows: list[dict[str, str]]) -> list[Any]:
    """tabpo's own encoding of the pairs (its chat-template rendering, a real model's)."""
    from tabpo.common.files import write_jsonl
    from tabpo.data.encoding import encode_pairs
    from tabpo.data.records import read_preferences

    with tempfile.TemporaryDirectory() as tmp:
        pairs = read_preferences(write_jsonl(rows, Path(tmp) / "pairs.jsonl"))[0]
    return encode_pairs(tokenizer, pairs, max_length=MAX_LENGTH)[0]


def _same_but_a_blank_tail(ours: list[int], theirs: list[int], tokenizer: Any) -> int:
    """How many tokens ``theirs`` has after ``ours``; a ValueError unless it starts with
    ``ours`` and what follows is whitespace (ChatML's newline after ``<|im_end|>``, which a
    chat template writes and the other tools train; tabpo trains up to the end-of-turn)."""
    extra = list(theirs[len(ours) :])
    if list(theirs[: len(ours)]) != list(ours) or tokenizer.decode(extra).strip():
        raise ValueError("different ids")
    return len(extra)


def _trl_rows(rows: list[dict[str, str]], tokenizer: Any) -> list[dict[str, Any]]:
    """The pairs as TRL must get them to tokenize them as we do.

    With a chat template (a real model): TRL's conversational format, one user turn and the
    assistant's answer, which TRL renders with the template as tabpo does.

    For standard (non-conversational) data TRL 1.x tokenizes ``prompt``, ``prompt + chosen`` and
    ``prompt + rejected`` (plain string concatenation) and appends ``eos_token`` to each
    completion string when missing. Concatenation without a separator would glue the last prompt
    word to the first completion word (one unknown token instead of two), so the prompt gets a
    trailing space, which the whitespace pre-tokenizer drops. The EOS string ``</s>`` is a
    special token and is split off even when glued, so the completions are passed unchanged. The
    tokenizer adds BOS to ``prompt`` and to ``prompt + completion``, once, at the start.
    """
    if tokenizer.chat_template:
        turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
        return [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
                 "rejected": turn("assistant", r["rejected"])} for r in rows]  # fmt: skip
    return [{"prompt": r["prompt"] + " ", "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows]  # fmt: skip


def _check_trl_ids(dataset: Any, rows: list[dict[str, str]], tokenizer: Any) -> int:
    """Fail unless TRL's tokenized dataset holds exactly our ids, row by row; return the
    completion tokens TRL adds after ours (with a chat template: its blank tail, else 0).

    TRL's collator builds each sequence as ``prompt_ids + chosen_ids`` (or ``+ rejected_ids``)
    with attention-mask ones over exactly those tokens (then right-pads), so equal ids mean the
    model sees len(prompt_ids) + len(completion_ids) non-pad tokens per sequence, as ours does.
    """
    if len(dataset) != len(rows):
        raise AssertionError(f"TRL kept {len(dataset)} of {len(rows)} pairs")
    if tokenizer.chat_template:
        extra = 0
        for i, ours in enumerate(_templated_ids(tokenizer, rows)):
            got = dataset[i]
            try:
                if list(got["prompt_ids"]) != ours.prompt_ids:
                    raise ValueError("different prompt")
                extra += _same_but_a_blank_tail(ours.chosen_ids, got["chosen_ids"], tokenizer)
                extra += _same_but_a_blank_tail(ours.rejected_ids, got["rejected_ids"], tokenizer)
            except ValueError:
                raise AssertionError(f"TRL tokenized pair {i} differently from tabpo") from None
        return extra
    for i, row in enumerate(rows):
        prompt, chosen, rejected = _our_ids(tokenizer, row)
        got = dataset[i]
        ids = (got["prompt_ids"], got["chosen_ids"], got["rejected_ids"])
        if ids != (prompt, chosen, rejected):
            raise AssertionError(f"TRL tokenized pair {i} differently from our trainer")
    return 0


def _trl_config(output_dir: str, *, batch_size: int, max_steps: int, seed: int,
                gradient_checkpointing: bool, precompute: bool) -> Any:  # fmt: skip
    """A ``DPOConfig`` with the benchmark's settings and nothing that adds time to a step."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        # optimisation: AdamW (torch), constant lr, no warmup / decay / clipping / accumulation
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,  # our trainer does not clip (TRL still computes the norm each step)
        bf16=False,  # DPOConfig defaults bf16 to True
        fp16=False,
        # DPO
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        gradient_checkpointing=gradient_checkpointing,
        precompute_ref_log_probs=precompute,
        # data: seeded shuffle per epoch (epochs repeat, so the pairs cycle), full batches only
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        # no eval, no checkpoints, no reporting; one log line at the very end
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=max_steps,
        disable_tqdm=True,
        log_level="error",
    )


def _trl_trainer(model: Any, tokenizer: Any, rows: list[dict[str, str]], config: Any,
                 peft_config: Any = None, callbacks: list | None = None) -> Any:  # fmt: skip
    """A ``DPOTrainer`` (subclassed only to record losses and time the precompute pass)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.step_losses: list[Any] = []
            self.precompute_s = 0.0
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.precompute_s += time.perf_counter() - start
            return out

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            self.step_losses.append(loss)  # detached; read after training, no sync here
            return loss

    trainer = TimedDPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(_trl_rows(rows, tokenizer)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log line
    trainer.extra_tokens = _check_trl_ids(trainer.train_dataset, rows, tokenizer)
    return trainer


def _lora_config() -> Any:
    """The benchmark's LoRA as a peft config (A random, B = 0, as peft initialises it)."""
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")  # fmt: skip


def _silence_hf_logging() -> None:
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def run_trl(fixture: Path, *, mode: str, steps: int, warmup: int, batch_size: int,
            seed: int = 0) -> dict:  # fmt: skip
    """Train with TRL's ``DPOTrainer`` and a fresh peft LoRA for ``warmup + steps`` steps.

    ``mode``: "gc_off" (no gradient checkpointing), "gc_on" (TRL's default, checkpointing on),
    "precompute" (no checkpointing, ``precompute_ref_log_probs=True``: the reference log-probs
    of every pair are computed in one pass, adapter disabled, inside the trainer's constructor).

    Timed per step (``time.perf_counter`` from the Trainer's ``on_step_begin`` to its
    ``on_step_end`` callback, with a CUDA synchronize at both ends on CUDA): ``training_step``
    (moving the batch to the device, the policy forward over the concatenated chosen+rejected
    batch, the reference forward with the adapter disabled unless precomputed, TRL's metrics,
    backward), the gradient-norm computation, ``optimizer.step()``, the scheduler step and
    ``zero_grad``. Not timed: fetching and collating the batch (done before ``on_step_begin``),
    logging (after ``on_step_end``). ``setup_s`` runs from model loading to the first step's
    start: model load, LoRA wrapping, tokenization, the precompute pass, optimizer creation.
    """
    if mode not in TRL_MODES:
        raise ValueError(f"mode must be one of {TRL_MODES}, got {mode!r}")
    with _quiet():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        _silence_hf_logging()

        class StepTimer(TrainerCallback):
            """Wall time of each optimizer step (see ``run_trl``)."""

            def __init__(self) -> None:
                self.times: list[float] = []
                self.first_start: float | None = None
                self._start = 0.0

            @staticmethod
            def _sync(args: Any) -> None:
                if args.device.type == "cuda":
                    torch.cuda.synchronize()

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                self._sync(args)
                self._start = time.perf_counter()
                if self.first_start is None:
                    self.first_start = self._start

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                self._sync(args)
                self.times.append(time.perf_counter() - self._start)

        start = time.perf_counter()
        model_dir = fixture / "model"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_config = _lora_config()
        timer = StepTimer()
        with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
            config = _trl_config(output_dir, batch_size=batch_size, max_steps=warmup + steps,
                                 seed=seed, gradient_checkpointing=mode == "gc_on",
                                 precompute=mode == "precompute")  # fmt: skip
            rows = _read_pairs(fixture, at_least=batch_size)
            trainer = _trl_trainer(model, tokenizer, rows, config, peft_config, [timer])
            trainer.train()
        cuda = trainer.args.device.type == "cuda"
        losses = [float(loss) for loss in trainer.step_losses]
        assert len(timer.times) == warmup + steps == len(losses)
        setup_s = (timer.first_start or start) - start
        reference = {
            "gc_off": "reference = the same model with the LoRA adapter disabled (no copy)",
            "gc_on": "reference = the same model with the LoRA adapter disabled (no copy); "
            "gradient checkpointing on (transformers 5 default: non-reentrant)",
            "precompute": f"reference log-probs precomputed before training in "
            f"{trainer.precompute_s:.3f} s (adapter disabled, batches of {batch_size}), included "
            "in setup_s; no reference forward in the steps",
        }[mode]
        notes = (
            f"TRL {_version('trl')} DPOTrainer, peft LoRA, mode {mode}: {reference}. "
            f"Device {trainer.args.device}, torch threads {torch.get_num_threads()}. "
            "One step = one concatenated policy forward over 2*batch sequences, "
            "right-padded to the batch's longest. Data: the prompt text gets a trailing space "
            "so TRL's prompt+completion string concatenation tokenizes like ours (ids checked "
            "pair by pair); seeded shuffle each epoch, last partial batch dropped. "
            "Timed: on_step_begin..on_step_end (forward(s), backward, grad-norm, AdamW step, "
            "zero_grad); batch collation and logging are outside."
        ) + _tail_note(trainer.extra_tokens, len(rows))
        return {
            "step_times": timer.times[warmup:],
            "losses": losses,
            "peak_memory_gb": _peak_memory_gb(cuda),
            "setup_s": setup_s,
            "notes": notes,
        }


def trl_first_batch_loss(fixture: Path, adapter_dir: Path | None, batch_size: int) -> float:
    """TRL's DPO loss (sigmoid, beta 0.1) on the first ``batch_size`` pairs in file order.

    Computed by TRL's own path: its dataset tokenization, ``DataCollatorForPreference`` and
    ``compute_loss`` (concatenated chosen+rejected forward with the fused LM head), the model
    in eval mode under ``torch.no_grad``. The policy is the base model with the LoRA adapter
    loaded from ``adapter_dir`` (``PeftModel.from_pretrained(..., is_trainable=True)``), or a
    fresh LoRA (B = 0, so the loss is log 2) when it is None. The reference is the base model
    with the adapter disabled: given a ``PeftModel`` that already has an adapter, TRL 1.x adds a
    frozen copy of it named "ref" and uses that as the reference (which would make the loss
    log 2 for any adapter), so that copy is deleted, leaving TRL's fresh-adapter behaviour
    (``use_adapter(model, None)`` = adapters disabled).
    """
    with _quiet():
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _silence_hf_logging()
        model_dir = fixture / "model"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_config = None
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        else:
            peft_config = _lora_config()
        rows = _read_pairs(fixture)[:batch_size]
        with tempfile.TemporaryDirectory(prefix="trl-loss-") as output_dir:
            config = _trl_config(output_dir, batch_size=len(rows), max_steps=1, seed=0,
                                 gradient_checkpointing=False, precompute=False)  # fmt: skip
            trainer = _trl_trainer(model, tokenizer, rows, config, peft_config)
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            if "ref" in peft_model.peft_config:
                peft_model.delete_adapter("ref")
                peft_model.set_adapter("default")
            trainer.model.eval()
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
            inputs = trainer._prepare_inputs(batch)
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, inputs)
        return float(loss)


# ---- mlx-lm-lora ------------------------------------------------------------------------------


@contextlib.contextmanager
def _mlx_linux_cpu_patch() -> Iterator[None]:
    """Let ``train_dpo`` start on a device whose info has no working-set size (Linux CPU).

    ``train_dpo`` calls ``mx.set_wired_limit(mx.device_info()[KEY])`` with
    KEY = "max_recommended_working_set_size", a key only Metal devices report; a missing key
    becomes 0 here (no wired limit, a no-op on CPU).
    Its progress bar is also forced off (it is created with an explicit ``disable=``).
    """
    import mlx.core as mx
    from mlx_lm_lora.trainer import dpo_trainer
    from tqdm import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    original_info, original_tqdm = mx.device_info, dpo_trainer.tqdm

    def device_info() -> dict:
        info = dict(original_info())
        info.setdefault("max_recommended_working_set_size", 0)
        return info

    mx.device_info, dpo_trainer.tqdm = device_info, SilentTqdm
    try:
        yield
    finally:
        mx.device_info, dpo_trainer.tqdm = original_info, original_tqdm


def run_mlx_lm_lora(fixture: Path, *, steps: int, warmup: int, batch_size: int,
                    seed: int = 0) -> dict:  # fmt: skip
    """Train with mlx-lm-lora's ``train_dpo`` for ``warmup + steps`` steps, set up as its CLI
    (``mlx_lm_lora.train --train-mode dpo --optimizer adamw``) sets it up, in float32 as every
    runner trains (its loader keeps the stored dtype: SmolLM2's is bfloat16, whose CPU matmul
    is MLX's own kernel, not BLAS: 330-500 s a step; the models are cast after loading).

    As ``mlx_lm_lora.train.run``/``train_model`` do: seed numpy, load the model and convert
    every layer's 7 linear projections to LoRA (``utils.from_pretrained``, rank 16, scale
    alpha/rank = 2.0, dropout 0), load the reference as a second full
    copy of the model, frozen (``load_reference_model``, its default when no
    ``--reference-model-path``), tokenize with ``DPODataset`` wrapped in ``CacheDataset``, seed
    mlx, build ``optim.AdamW(lr, weight_decay=0)`` (mlx's default: no bias correction) and call
    ``train_dpo`` with no validation set, reports every step and no intermediate saves.

    Timed per step: mlx-lm-lora's own window, ``steps_per_report / (stop - start)`` inverted
    (``steps_per_report`` = 1): from the end of the previous report to after ``mx.eval`` of the
    step's state, i.e. sampling and padding the batch (numpy), the compiled step (policy forward
    of chosen and of rejected, reference forward of both, backward, AdamW update) and its
    evaluation. The report itself (``.item()``, printing) is outside. ``setup_s`` runs from
    model loading to the first step's start.
    """
    with _quiet():
        import mlx.core as mx
        import mlx.optimizers as optim
        import numpy as np
        from mlx_lm.tuner.callbacks import TrainingCallback
        from mlx_lm_lora.train import load_reference_model
        from mlx_lm_lora.trainer.datasets import CacheDataset, DPODataset
        from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo
        from mlx_lm_lora.utils import from_pretrained
        from transformers import AutoTokenizer

        _silence_hf_logging()

        class Reports(TrainingCallback):
            """Per-step loss and time from ``train_dpo``'s reports (see ``run_mlx_lm_lora``)."""

            def __init__(self) -> None:
                self.losses: list[float] = []
                self.times: list[float] = []
                self.first_report = 0.0

            def on_train_loss_report(self, train_info: dict) -> None:
                if not self.times:
                    self.first_report = time.perf_counter()
                self.losses.append(float(train_info["train_loss"]))
                self.times.append(1.0 / float(train_info["iterations_per_second"]))

        start = time.perf_counter()
        model_dir = str(fixture / "model")
        np.random.seed(seed)
        with tempfile.TemporaryDirectory(prefix="mlx-bench-") as adapter_dir:
            lora = {"rank": LORA_RANK, "dropout": 0.0, "scale": LORA_ALPHA / LORA_RANK,
                    "use_dora": False, "num_layers": -1}  # fmt: skip
            model, tokenizer, adapter_file = from_pretrained(
                model=model_dir, new_adapter_path=adapter_dir, lora_config=lora
            )
            reference = load_reference_model(
                argparse.Namespace(model=model_dir, reference_model_path=None)
            )
            stored = _float32(model, reference)
            if not tokenizer.chat_template:  # a real model keeps its own
                tokenizer.chat_template = _MLX_CHAT_TEMPLATE
            rows = _read_pairs(fixture, at_least=batch_size)
            dataset = DPODataset(rows, tokenizer)
            extra = _check_mlx_ids(dataset, rows, AutoTokenizer.from_pretrained(model_dir))
            mx.random.seed(seed)
            optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)
            args = DPOTrainingArgs(
                batch_size=batch_size,
                iters=warmup + steps,
                steps_per_report=1,
                steps_per_eval=10**9,
                steps_per_save=10**9,
                adapter_file=adapter_file,
                max_seq_length=MAX_LENGTH,
                grad_checkpoint=False,
                beta=BETA,
                loss_type="sigmoid",
                seq_step_size=None,
                gradient_accumulation_steps=1,
            )
            reports = Reports()
            with _mlx_linux_cpu_patch():
                train_dpo(model=model, ref_model=reference, optimizer=optimizer,
                          train_dataset=CacheDataset(dataset), val_dataset=None, args=args,
                          training_callback=reports, loss_type="sigmoid")  # fmt: skip
        assert len(reports.times) == warmup + steps
        setup_s = reports.first_report - reports.times[0] - start
        notes = (
            f"mlx-lm-lora {_version('mlx-lm-lora')} train_dpo on mlx {mx.__version__} "
            f"({mx.default_device()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', 'unset')}: "
            "the mlx[cpu] wheel bundles a reference BLAS unless OpenBLAS is preloaded). "
            f"Weights stored as {stored}, cast to float32 after loading (mlx-lm-lora keeps "
            "the stored dtype; MLX's CPU bfloat16 matmul is its own kernel, not BLAS: "
            "330-500 s a step on SmolLM2). "
            "Memory: the policy (base + LoRA) and a SECOND full "
            "frozen copy of the model as reference (load_reference_model, the CLI default). "
            "One step = 4 forwards of batch x length (policy chosen, policy rejected, reference "
            "chosen, reference rejected; no prompt sharing), backward through the two policy ones. "
            "Tokenization: a chat template that renders BOS + prompt + completion + EOS (its "
            "DPODataset always applies one), ids checked pair by pair; the model input is the "
            "sequence minus its last token (targets shifted). Data: every step draws a random "
            "batch (np.random, seeded) from fixed length-sorted chunks of the pairs, as "
            "train_dpo does (with replacement across steps). AdamW without bias correction "
            "(mlx default), no clipping. Timed: mlx-lm-lora's own per-report window (batch "
            "sampling + compiled step + mx.eval); peak_memory_gb is peak RSS "
            f"(mlx peak allocation {mx.get_peak_memory() / 1e9:.3f} GB)."
        ) + _tail_note(extra, len(rows))
        return {
            "step_times": reports.times[warmup:],
            "losses": reports.losses,
            "peak_memory_gb": _peak_memory_gb(),
            "setup_s": setup_s,
            "notes": notes,
        }


def _float32(*models: Any) -> str:
    """Cast every parameter of the MLX ``models`` to float32; return the stored dtype(s)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    stored = {str(v.dtype).removeprefix("mlx.core.") for m in models
              for _, v in tree_flatten(m.parameters())}  # fmt: skip
    for m in models:
        m.set_dtype(mx.float32)
    return "/".join(sorted(stored))


def _tail_note(extra: int, pairs: int) -> str:
    if not extra:
        return ""
    return (f" With the model's chat template the ids are tabpo's plus {extra} token(s) over "
            f"{pairs} pairs after the end-of-turn (the template's newline), which this tool "
            "trains and tabpo does not; checked pair by pair.")  # fmt: skip


def _check_mlx_ids(dataset: Any, rows: list[dict[str, str]], tokenizer: Any) -> int:
    """Fail unless mlx-lm-lora's ``DPODataset`` holds exactly our sequences and prompt lengths;
    return the tokens it adds after ours (with a chat template: its blank tail, else 0).

    ``iterate_dpo_batches`` puts ``chosen``/``rejected`` ids into zero-padded arrays and masks
    the loss to positions ``[prompt_length, length)``, so equal ids and prompt lengths mean the
    same tokens and the same completion tokens as ours.
    """
    if tokenizer.chat_template:
        extra = 0
        for i, ours in enumerate(_templated_ids(tokenizer, rows)):
            got, n = dataset[i], len(ours.prompt_ids)
            try:
                for side, ids in (("chosen", ours.chosen_ids), ("rejected", ours.rejected_ids)):
                    if got[f"{side}_prompt_length"] != n:
                        raise ValueError("different prompt")
                    extra += _same_but_a_blank_tail(ours.prompt_ids + ids, got[side], tokenizer)
            except ValueError:
                raise AssertionError(f"mlx-lm-lora tokenized pair {i} unlike tabpo") from None
        return extra
    for i, row in enumerate(rows):
        prompt, chosen, rejected = _our_ids(tokenizer, row)
        got = dataset[i]
        if (
            list(got["chosen"]) != prompt + chosen
            or list(got["rejected"]) != prompt + rejected
            or got["chosen_prompt_length"] != len(prompt)
            or got["rejected_prompt_length"] != len(prompt)
        ):
            raise AssertionError(f"mlx-lm-lora tokenized pair {i} differently from our trainer")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ---- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=["trl", "mlx", "trl-loss"])
    parser.add_argument("--fixture", type=Path, required=True)
    parser.add_argument("--mode", choices=TRL_MODES, default="gc_off", help="trl only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", type=Path, default=None, help="trl-loss only")
    a = parser.parse_args(argv)
    if a.tool == "trl":
        result: dict = run_trl(a.fixture, mode=a.mode, steps=a.steps, warmup=a.warmup,
                               batch_size=a.batch_size, seed=a.seed)  # fmt: skip
    elif a.tool == "mlx":
        result = run_mlx_lm_lora(a.fixture, steps=a.steps, warmup=a.warmup,
                                 batch_size=a.batch_size, seed=a.seed)  # fmt: skip
    else:
        result = {"loss": trl_first_batch_loss(a.fixture, a.adapter, a.batch_size)}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
