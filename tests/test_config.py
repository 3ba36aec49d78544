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
