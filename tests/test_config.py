"""Training configuration: YAML keys = option names, flags over the file, clear errors."""

from __future__ import annotations

import pytest

from tabpo.common.errors import TabpoError
from tabpo.training import config as cfg

REQUIRED = {"model": "m", "data": "d.jsonl", "output": "out"}


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_implementation():
    """docs/method.md §2: lr 2e-4, 3 epochs, batch 1 x 2, warmup 10%, linear, no clipping,
    LoRA 16 / 32 / 0.05 on the seven projections."""
    c = cfg.build({}, REQUIRED)
    assert (c.learning_rate, c.epochs, c.batch_size, c.gradient_accumulation_steps) == (
        2e-4, 3.0, 1, 2,
    )  # fmt: skip
    assert (c.warmup_ratio, c.lr_scheduler, c.max_grad_norm) == (0.1, "linear", None)
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (16, 32.0, 0.05)
    assert len(c.target_modules()) == 7 and c.loss == "tabpo"
    assert c.loss_hparams() == {}  # the loss's own defaults apply


def test_file_then_flags(tmp_path):
    path = write(tmp_path, "learning-rate: 1.0e-5\nloss_type: dpo\nbeta: 0.3\n"
                 "field_weights: {Code: 2.0}\nlora_target_modules: [q_proj, v_proj]\n")  # fmt: skip
    c = cfg.build(cfg.read_yaml(path), {**REQUIRED, "beta": 0.7, "learning_rate": None})
    assert c.learning_rate == 1e-5 and c.loss == "dpo"
    assert c.beta == 0.7  # the flag wins
    assert c.field_weight_map() == {"Code": 2.0}
    assert c.target_modules() == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "text, message",
    [
        ("beta: 0.1\nlr: 3\n", "c.yaml:2: unknown option 'lr'"),
        ("beta: [1\n", r"c.yaml:\d+: invalid YAML"),
        ("batch_size: 2.5\n", "c.yaml:1: option 'batch_size' expects int"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_yaml_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(TabpoError, match=message):
        cfg.read_yaml(write(tmp_path, text))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loss": "dpo", "tau": 0.9}, "loss 'dpo' has no hyperparameter 'tau'"),
        ({"loss": "tdpo", "precompute_ref": True}, "needs the full-vocabulary KL"),
        ({"loss": "simpo", "precompute_ref": True}, "uses no reference"),
        ({"ref_model": "r"}, "--ref-model is for full fine-tuning"),
        ({"resume": "x", "force": True}, "contradict"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"loss": "nope"}, "unknown loss 'nope'"),
        ({"field_weights": "Code:1"}, "expected 'Key=number'"),
        ({"output": None}, "--output is required"),
    ],
)
def test_contradictions_are_one_line_errors(values, message):
    with pytest.raises(TabpoError, match=message):
        cfg.build({}, {**REQUIRED, **values, **({"output": None} if "output" in values else {})})


def test_precompute_default_follows_the_loss():
    assert cfg.use_precomputed_reference(cfg.build({}, REQUIRED))
    assert not cfg.use_precomputed_reference(cfg.build({}, {**REQUIRED, "loss": "tdpo"}))
    assert not cfg.use_precomputed_reference(cfg.build({}, {**REQUIRED, "loss": "sft"}))


def test_yaml_round_trip(tmp_path):
    c = cfg.build({}, {**REQUIRED, "loss": "ipo", "normalize": False, "max_steps": 7})
    again = cfg.build(cfg.read_yaml(write(tmp_path, cfg.to_yaml(c))), {})
    assert again == c


def test_a_trl_dpo_config_mostly_just_works(tmp_path):
    """TRL's DPOConfig keys and loss names, with the same meaning."""
    path = write(tmp_path, "model: m\ndata: d.jsonl\noutput_dir: runs/x\nloss_type: sigmoid\n"
                 "per_device_train_batch_size: 4\nper_device_eval_batch_size: 8\n"
                 "num_train_epochs: 2\nlr_scheduler_type: cosine\nbeta: 0.1\n"
                 "gradient_checkpointing: true\nreport_to: [tensorboard]\n"
                 "precompute_ref_log_probs: true\nresume_from_checkpoint: true\n")  # fmt: skip
    c = cfg.build(cfg.read_yaml(path), {})
    assert (c.output, c.loss, c.batch_size, c.eval_batch_size, c.epochs) == (
        "runs/x", "dpo", 4, 8, 2.0)  # fmt: skip
    assert (c.lr_scheduler, c.gradient_checkpointing, c.reporters()) == (
        "cosine", True, ["tensorboard"])  # fmt: skip
    assert c.precompute_ref is True and c.resume == "runs/x"  # true: the newest checkpoint


def test_mlx_lm_names_that_map_cleanly(tmp_path):
    path = write(tmp_path, "model: m\ndata: d.jsonl\nadapter_path: ad\niters: 50\n"
                 "max_seq_length: 512\ngrad_checkpoint: true\nsteps_per_report: 5\n"
                 "steps_per_eval: 25\nsave_every: 10\nfine_tune_type: lora\n")  # fmt: skip
    c = cfg.build(cfg.read_yaml(path), {})
    assert (c.output, c.max_steps, c.max_length, c.gradient_checkpointing) == (
        "ad", 50, 512, True)  # fmt: skip
    assert (c.logging_steps, c.eval_steps, c.save_steps, c.finetune) == (5, 25, 10, "lora")


@pytest.mark.parametrize(
    "text, message",
    [
        ("bf16: true\n", r"c.yaml:1: option 'bf16' is not supported: there is no autocast"),
        ("num_layers: 8\n", r"c.yaml:1: option 'num_layers' is not supported: .*every layer"),
        ("max_prompt_length: 128\n", "prompts are cut from the left"),
        ("learnig_rate: 1e-5\n", r"c.yaml:1: unknown option 'learnig_rate' \(did you mean "
                                 r"'learning_rate'\?\)"),
        ("per_device_batch_size: 2\n", "did you mean 'per_device_"),
        ("report_to: mlflow\n", "--report-to: unknown 'mlflow'"),
        ("force: true\n", "unknown option 'force'"),
    ],
)  # fmt: skip
def test_foreign_keys_say_why_in_one_line(tmp_path, text, message):
    with pytest.raises(TabpoError, match=message):
        cfg.build(cfg.read_yaml(write(tmp_path, text)), REQUIRED)
