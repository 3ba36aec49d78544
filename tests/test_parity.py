"""MLX and PyTorch compute the same thing: one safetensors model loaded by both backends.

float32 throughout (bf16 has its own loose smoke test). Tolerance: 1e-5 relative to the
largest magnitude of the quantity compared (docs/design.md, "Two stacks, one model": the
stacks agree to ~2e-6 on the logits of a small model). Failure messages print the max and
mean difference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_FAMILIES, adam_close, build_tiny_model, write_pairs

from tabpo import losses
from tabpo.backends import get_backend
from tabpo.data.batching import collate
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
from tabpo.data.records import read_preferences
from tabpo.training import config as cfg
from tabpo.training.backend import LoraSettings, ModelOptions, OptimizerSettings
from tabpo.training.loop import train

REL = 1e-5
# Gradients: MLX's own float32 gradients are up to 1.6e-5 (torch's 4e-6) from float64 on
# these models for losses whose gradient cancels between near-identical chosen and rejected
# (cal_dpo, tabpo v2; measured against torch in float64), so the stacks can only agree to
# about the sum of the two. Everything else is held to REL.
GRAD_REL = 3e-5
LOSS_CASES = [(name, {}) for name in losses.names()] + [("tabpo", {"variant": "v2"})]


def close(a, b, what, rel=REL, floor=0.0):
    """``||a - b|| <= rel * max(||a||, ||b||, floor)`` (2-norms; for scalars, abs values).

    A norm, not the worst element: a few near-zero gradients whose float32 rounding differs
    in sign (and so move the first AdamW step by +-lr) should not hide that the tensor
    agrees. ``floor``: the size of what a scalar is computed from (a margin of 0.05 is a
    difference of sequence log-probs of ~100, and float32 rounds those).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), floor)
    assert np.linalg.norm(diff) <= rel * scale, (
        f"{what}: relative diff {np.linalg.norm(diff) / max(scale, 1e-30):.3g} "
        f"(max abs diff {diff.max(initial=0.0):.3g}, mean {diff.mean():.3g}, tolerance {rel})"
    )


def close_tree(a, b, what, rel=GRAD_REL, per_tensor=1e-4):
    """Parameter trees: every tensor, and the whole tree (the global norm a clip sees).

    The LoRA factors are set to std 0.05 (trained adapters' size): with std 0.3 the tiny
    random models become so peaky that float32 itself is ~1e-5 from float64 on either
    stack alone (measured 6e-6 torch, 1.4e-5 MLX), and no two float32 stacks can agree
    closer than that. At 0.05 each stack is ~5e-7 from float64.
    """
    assert sorted(a) == sorted(b), f"{what}: different parameter names"
    for key in a:  # a structural bug (transposed factor, wrong scale) is off by O(1)
        close(a[key], b[key], f"{what} {key}", rel=per_tensor)
    flat_a = np.concatenate([np.ravel(a[k]) for k in sorted(a)])
    flat_b = np.concatenate([np.ravel(b[k]) for k in sorted(b)])
    close(flat_a, flat_b, f"{what} (all parameters)", rel=rel)


def magnitude(result):
    """The largest per-pair sequence log-prob a step's metrics are computed from."""
    return max(abs(result.metrics.get("logps/chosen", 1.0)),
               abs(result.metrics.get("logps/rejected", 1.0)), 1.0)  # fmt: skip


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_dir(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def batch(family_dir, tmp_path_factory):
    path = write_pairs(tmp_path_factory.mktemp("d") / "pairs.jsonl", 4)
    tokenizer = load_tokenizer(family_dir)
    pairs, _ = encode_pairs(tokenizer, read_preferences(path)[0])
    return collate(pairs, pad_id(tokenizer))


def both(model_dir, finetune="lora", dtype="float32"):
    """Both backends on the same weights; LoRA factors set to the same non-zero values."""
    options = ModelOptions(path=str(model_dir), dtype=dtype, finetune=finetune,
                           lora=LoraSettings(rank=4, alpha=8.0, dropout=0.0))  # fmt: skip
    t, m = get_backend("torch"), get_backend("mlx")
    t.load(options)
    m.load(options)
    if finetune == "lora":
        rng = np.random.default_rng(0)
        state = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
                 for k, v in t.trainable_state().items()}  # fmt: skip
        t.load_trainable_state(state)
        m.load_trainable_state(state)
    for b in (t, m):
        b.setup_optimizer(OptimizerSettings(weight_decay=0.01))
    return t, m


@pytest.fixture(scope="module")
def lora_pair(family_dir):
    return both(family_dir)


def test_lora_states_share_names_and_shapes(lora_pair):
    t, m = lora_pair
    ts, ms = t.trainable_state(), m.trainable_state()
    assert sorted(ts) == sorted(ms)
    assert len(ts) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    for k in ts:
        close(ts[k], ms[k], f"LoRA {k}", rel=0.0)


def test_logps_agree(lora_pair, batch):
    t, m = lora_pair
    for reference in (False, True):
        for side, a, b in zip(("chosen", "rejected"), t.logps(batch, reference=reference),
                              m.logps(batch, reference=reference), strict=True):  # fmt: skip
            close(a, b, f"{side} log-probs (reference={reference})")
    policy, ref = t.logps(batch)[0], t.logps(batch, reference=True)[0]
    assert np.abs(policy - ref).max() > 1e-3  # the adapter is really on


@pytest.mark.parametrize("name, hp", LOSS_CASES, ids=[f"{n}{h or ''}" for n, h in LOSS_CASES])
def test_loss_metrics_and_gradients_agree(lora_pair, batch, name, hp):
    t, m = lora_pair
    objective = losses.get(name).bind(**hp)
    rt, rm = t.evaluate(batch, objective, None), m.evaluate(batch, objective, None)
    close(rt.loss, rm.loss, f"{name} loss", floor=1.0)
    assert set(rt.metrics) == set(rm.metrics)
    for key in rt.metrics:
        close(rt.metrics[key], rm.metrics[key], f"{name} {key}", floor=magnitude(rt))
    try:
        ft = t.forward_backward(batch, objective, None, scale=1.0)
        fm = m.forward_backward(batch, objective, None, scale=1.0)
        close(ft.loss, rt.loss, f"{name} train-mode vs eval-mode loss (dropout 0)", floor=1.0)
        close_tree(t.gradients(), m.gradients(), f"{name} gradients")
        # per-pair losses, like the metrics, relative to the log-probs they come from: cal_dpo's
        # squared terms turn a 1e-7 log-prob rounding into ~1e-5 of the loss itself
        close(ft.per_pair, fm.per_pair, f"{name} per-pair loss", floor=magnitude(rt))
    finally:
        t.zero_grad(), m.zero_grad()


def test_weights_after_one_adamw_step_agree(family_dir, batch):
    t, m = both(family_dir)
    objective = losses.get("tabpo").bind()
    t.forward_backward(batch, objective, None, 1.0)
    m.forward_backward(batch, objective, None, 1.0)
    close(t.optimizer_step(1e-2, 1.0), m.optimizer_step(1e-2, 1.0), "grad norm")
    after_t, after_m = t.trainable_state(), m.trainable_state()
    for key in after_t:  # AdamW's step is ~lr * sign(g): noise where g is float32 noise
        adam_close(after_t[key], after_m[key], lr=1e-2, steps=1, what=f"after AdamW {key}")
    flat = [np.concatenate([np.ravel(s[k]) for k in sorted(s)]) for s in (after_t, after_m)]
    adam_close(flat[0], flat[1], lr=1e-2, steps=1, what="after AdamW, all parameters")


def test_full_finetuning_gradients_agree(family_dir, batch):
    t, m = both(family_dir, finetune="full")
    objective = losses.get("dpo").bind()
    t.forward_backward(batch, objective, None, 1.0)
    m.forward_backward(batch, objective, None, 1.0)
    close_tree(t.gradients(), m.gradients(), "full gradients")
    t.optimizer_step(1e-3, None), m.optimizer_step(1e-3, None)
    close_tree(t.trainable_state(), m.trainable_state(), "full weights after one AdamW step")


def test_bf16_smoke(family_dir, batch):
    """bf16 on both stacks: sequence log-probs within 0.1 nats (the stacks differ by ~0.02 over 128
    tokens on a tiny model; our completions are ~40 tokens but weights are larger)."""
    t, m = both(family_dir, dtype="bfloat16")
    tc, mc = t.logps(batch)[0].sum(-1), m.logps(batch)[0].sum(-1)
    assert np.isfinite(tc).all() and np.isfinite(mc).all()
    assert np.abs(tc - mc).max() < 0.1, f"bf16 sequence log-probs differ by {np.abs(tc - mc)}"


def test_five_step_trajectory(tmp_path):
    """`train` on both backends from one seed: the same LoRA start (seeded in the core), the
    same data order; loss and grad norm agree step by step (1e-4 relative over 5 steps of
    float32 drift)."""
    model = build_tiny_model(tmp_path / "m", "qwen2")
    data = write_pairs(tmp_path / "d.jsonl", 10)
    records = {}
    for backend in ("torch", "mlx"):
        c = cfg.build({}, {"model": str(model), "data": str(data), "backend": backend,
                           "output": str(tmp_path / backend), "max_steps": 5,
                           "learning_rate": 5e-3, "lora_dropout": 0.0, "lora_rank": 4,
                           "ref_cache_dir": str(tmp_path / "cache")})  # fmt: skip
        train(c, get_backend(backend))
        lines = (tmp_path / backend / "metrics.jsonl").read_text().splitlines()
        records[backend] = [json.loads(x) for x in lines]
    for key in ("loss", "grad_norm", "rewards/margins"):
        close([r[key] for r in records["torch"]], [r[key] for r in records["mlx"]],
              f"5-step {key}", rel=1e-4)  # fmt: skip


def test_completion_only_batch(lora_pair, family_dir, tmp_path):
    """SFT data: only the chosen side runs; log-probs, loss and gradients agree."""
    from helpers import write_completions

    tokenizer = load_tokenizer(family_dir)
    examples = read_preferences(write_completions(tmp_path / "sft.jsonl", 3))[0]
    pairs, _ = encode_pairs(tokenizer, examples)
    batch = collate(pairs, pad_id(tokenizer))
    assert batch.rejected_ids is None
    t, m = lora_pair
    (tc, tr), (mc, mr) = t.logps(batch), m.logps(batch)
    assert tr is None and mr is None
    close(tc, mc, "completion-only log-probs")
    objective = losses.get("sft").bind()
    try:
        ft = t.forward_backward(batch, objective, None, 1.0)
        fm = m.forward_backward(batch, objective, None, 1.0)
        close(ft.loss, fm.loss, "sft loss", floor=1.0)
        close(ft.loss, -np.mean((tc * batch.chosen_mask).sum(-1) / batch.chosen_mask.sum(-1)),
              "sft loss = per-example token-mean NLL", floor=1.0)  # fmt: skip
        assert ft.tokens == int(batch.chosen_attention_mask.sum())
        close_tree(t.gradients(), m.gradients(), "sft gradients")
    finally:
        t.zero_grad(), m.zero_grad()
