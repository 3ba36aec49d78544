"""The MLX backend against oracles it does not share code with.

Log-prob oracle: the full logits of a model, log-softmaxed in float64 NumPy, gathered at
each completion token from the previous position:

    l[b, t] = z[b, t-1, ids[b, t]] - logsumexp_v z[b, t-1, v]     (m[b, t] = 1; 0 elsewhere)

with z from mlx-lm's own ``model(ids)`` (a plain load of the same directory) or from
transformers' ``AutoModelForCausalLM`` (which reads rope_theta and tie_word_embeddings its
own way, so agreement proves the overrides). Models are tiny and random (tests/helpers.py),
float32 unless stated.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ANNOTATION, head_chunk_rows

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.utils import load as mlx_load  # noqa: E402

from tabpo import losses  # noqa: E402
from tabpo.backends.mlx import MlxBackend  # noqa: E402
from tabpo.common.errors import TabpoError  # noqa: E402
from tabpo.data.batching import collate  # noqa: E402
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id  # noqa: E402
from tabpo.data.records import PreferenceExample  # noqa: E402
from tabpo.models.families import LORA_TARGETS, inspect_model_dir  # noqa: E402
from tabpo.training.backend import LoraSettings, ModelOptions, OptimizerSettings  # noqa: E402

LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0)
FAMILIES = [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen2", True)]
IDS = [f"{f}-tied" if tie else f for f, tie in FAMILIES]
PROMPTS = [
    "Annotate: Thank you doctor, I trust your judgement.",
    "Annotate: the rent is late again this month.",
    "Annotate: happy to help with anything you need.",
    "Annotate: I trust your judgement",
]
VARIANTS = [
    (ANNOTATION, ANNOTATION.replace("build trust", "connection")),
    (ANNOTATION.replace("PartnershipPatient", "SDOH"), ANNOTATION),
    (ANNOTATION, ANNOTATION.replace("I trust your judgement", "happy to help")),
    (ANNOTATION, '{"results": []}'),
]


# -- fixtures and oracles --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tiny_model):
    """family id -> tiny model directory (rope_theta nested the transformers-5 way)."""
    pairs = zip(IDS, FAMILIES, strict=True)
    out = {name: tiny_model(family, tie=tie) for name, (family, tie) in pairs}
    out["llama-17"] = tiny_model("llama", layers=17)
    out["llama-other"] = tiny_model("llama", seed=1)
    return out


@pytest.fixture(scope="module")
def pairs(dirs):
    tokenizer = load_tokenizer(dirs["llama"])
    examples = [
        PreferenceExample([{"role": "user", "content": p}], c, r, i + 1, False)
        for i, (p, (c, r)) in enumerate(zip(PROMPTS, VARIANTS, strict=True))
    ]
    encoded, _ = encode_pairs(tokenizer, examples)
    return encoded, pad_id(tokenizer)


@pytest.fixture(scope="module")
def batch(pairs):
    encoded, pad = pairs
    return collate(encoded, pad)


def make(path, *, seed=0, **options) -> MlxBackend:
    backend = MlxBackend()
    backend.seed(seed)
    backend.load(ModelOptions(str(path), **options))
    return backend


def nonzero_b(backend: MlxBackend, seed: int = 1) -> None:
    """Give every LoRA B factor random values so the adapter changes the function."""
    rng = np.random.default_rng(seed)
    state = backend.trainable_state()
    for key, value in state.items():
        if key.endswith("lora_B"):
            state[key] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    backend.load_trainable_state(state)


def log_softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def naive_logps(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logp = log_softmax64(logits)  # (B, T, V)
    out = np.zeros(ids.shape)
    out[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return out * mask


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def plain_mlx(path):
    """mlx-lm's own load of the directory, with the overrides the backend is told to pass."""
    model, _ = mlx_load(str(path), model_config=inspect_model_dir(path).mlx_overrides())
    return model


def hf_logits(path, ids: np.ndarray, attention: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(attention).long())
    return out.logits.float().numpy()


def sides(batch):
    return [(batch.chosen_ids, batch.chosen_mask), (batch.rejected_ids, batch.rejected_mask)]


def oracle(model, batch):
    return [naive_logps(mlx_logits(model, ids), ids, m) for ids, m in sides(batch)]


def assert_close(got, want, atol, what):
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
    assert diff.max() <= atol, (
        f"{what}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g} (tolerance {atol})"
    )


# -- 1. log-probs ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", IDS)
def test_logps_match_own_logits_and_transformers(dirs, batch, family):
    """Policy and reference (adapter B = 0, so both are the base model) equal the naive
    gather from mlx-lm's full logits (1e-5) and transformers' (1e-4); 0 off the mask."""
    backend = make(dirs[family], lora=LORA)
    policy, reference = backend.logps(batch), backend.logps(batch, reference=True)
    mlx_want = oracle(plain_mlx(dirs[family]), batch)
    attentions = (batch.chosen_attention_mask, batch.rejected_attention_mask)
    for side, (ids, mask), attention, got, ref, want in zip(
        ("chosen", "rejected"), sides(batch), attentions, policy, reference, mlx_want, strict=True
    ):
        assert got.dtype == np.float32 and got.shape == ids.shape
        assert_close(got, want, 1e-5, f"{family} {side} policy vs mlx-lm logits")
        assert_close(ref, want, 1e-5, f"{family} {side} reference vs mlx-lm logits")
        hf = naive_logps(hf_logits(dirs[family], ids, attention), ids, mask)
        assert_close(got, hf, 1e-4, f"{family} {side} policy vs transformers")
        assert np.all(got[mask == 0] == 0.0) and np.all(ref[mask == 0] == 0.0)
        assert np.all(got[mask > 0] < 0.0)


def test_lora_reference_is_the_base_model(dirs, batch):
    """With B != 0 the policy is the adapted model (its own full logits) and the reference
    is still the base model: the adapter is off, not merely zero."""
    backend = make(dirs["llama"], lora=LORA)
    nonzero_b(backend)
    policy, reference = backend.logps(batch), backend.logps(batch, reference=True)
    base, adapted = oracle(plain_mlx(dirs["llama"]), batch), oracle(backend.model, batch)
    for side in range(2):
        assert_close(reference[side], base[side], 1e-5, "reference vs base model")
        assert_close(policy[side], adapted[side], 1e-5, "policy vs adapted model's logits")
        assert np.abs(policy[side] - reference[side]).max() > 1e-2, "the adapter did nothing"
    scales = {m.scale for _, m in backend.model.named_modules() if isinstance(m, LoRALinear)}
    assert scales == {LORA.scale}, "the adapter was not switched back on"


# -- 2. LoRA structure -----------------------------------------------------------------------


def test_lora_wraps_every_layer_and_projection(dirs):
    """17 layers (more than mlx-lm's default of the last 16), 7 projections each, scale
    alpha / r = 8 / 4 = 2; canonical factors A (r, in), B (out, r)."""
    backend = make(dirs["llama-17"], lora=LORA)
    for i, layer in enumerate(backend.model.layers):
        wrapped = {k for k, m in layer.named_modules() if isinstance(m, LoRALinear)}
        assert {k.rsplit(".", 1)[-1] for k in wrapped} == set(LORA_TARGETS), f"layer {i}"
        for _, m in layer.named_modules():
            if isinstance(m, LoRALinear):
                assert m.scale == 2.0 and m.lora_a.shape[1] == 4
    state = backend.trainable_state()
    assert len(state) == 17 * 7 * 2
    assert state["model.layers.16.self_attn.q_proj.lora_A"].shape == (4, 32)  # (r, in)
    assert state["model.layers.16.mlp.down_proj.lora_A"].shape == (4, 64)
    assert state["model.layers.16.mlp.down_proj.lora_B"].shape == (32, 4)  # (out, r)
    assert not any(np.any(v) for k, v in state.items() if k.endswith("lora_B"))


def test_lora_subset_and_unknown_target(dirs):
    backend = make(dirs["llama"], lora=LoraSettings(rank=2, target_modules=("q_proj", "v_proj")))
    assert {k.split(".")[-2] for k in backend.trainable_state()} == {"q_proj", "v_proj"}
    with pytest.raises(TabpoError, match="LoRA target module 'xyz' is not in the model"):
        make(dirs["llama"], lora=LoraSettings(target_modules=("q_proj", "xyz")))


def test_bad_directory_raises(tmp_path):
    with pytest.raises(TabpoError, match="no config.json"):
        make(tmp_path)


def test_load_trainable_state_checks_names_and_shapes(dirs):
    """Canonical orientation is enforced: a transposed (in, r) A factor is refused, as are
    missing and unknown keys."""
    backend = make(dirs["llama"], lora=LORA)
    state = backend.trainable_state()
    key = "model.layers.0.self_attn.q_proj.lora_A"
    for bad, match in (
        ({**state, key: state[key].T}, "shape"),
        ({k: v for k, v in state.items() if k != key}, "missing"),
        ({**state, "model.layers.0.mlp.up_proj.lora_C": state[key]}, "unknown"),
    ):
        with pytest.raises(TabpoError, match=match):
            backend.load_trainable_state(bad)


# -- 3. accumulation --------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["tabpo", "dpo"])
def test_two_halves_equal_the_whole_batch(dirs, pairs, loss):
    """mean over 4 pairs = 0.5 * mean(first 2) + 0.5 * mean(last 2), so the gradients of the
    halves with scale 0.5, summed, equal the whole batch's with scale 1 (each half padded
    to its own length: right padding changes nothing before it)."""
    encoded, pad = pairs
    objective = losses.get(loss).bind()
    whole, halves = make(dirs["llama"], lora=LORA), make(dirs["llama"], lora=LORA)
    for backend in (whole, halves):
        nonzero_b(backend)
    result = whole.forward_backward(collate(encoded, pad), objective, None, 1.0)
    parts = [
        halves.forward_backward(collate(encoded[s], pad), objective, None, 0.5)
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert result.tokens == sum(p.tokens for p in parts)
    assert np.isclose(result.loss, 0.5 * (parts[0].loss + parts[1].loss), rtol=1e-6)
    want, got = whole.gradients(), halves.gradients()
    assert want.keys() == got.keys()
    # float32 sums over 4 rows vs 2 + 2 differ in order: compare relative to the whole norm
    w = np.concatenate([want[k].ravel() for k in want]).astype(np.float64)
    g = np.concatenate([got[k].ravel() for k in want]).astype(np.float64)
    relative = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert relative <= 1e-6, (
        f"{loss}: relative gradient error {relative:.3g}, max diff {np.abs(g - w).max():.3g}, "
        f"mean diff {np.abs(g - w).mean():.3g}, largest gradient {np.abs(w).max():.3g}"
    )


# -- 4. optimizer -----------------------------------------------------------------------------


def first_adam_step(p, g, lr, eps, wd):
    """AdamW's first step with bias correction, from m = v = 0 (float64):

    m1 = (1 - b1) g,  v1 = (1 - b2) g^2
    m^ = m1 / (1 - b1) = g,  v^ = v1 / (1 - b2) = g^2
    p1 = p (1 - lr wd) - lr m^ / (sqrt(v^) + eps) = p (1 - lr wd) - lr g / (|g| + eps)
    """
    p, g = p.astype(np.float64), g.astype(np.float64)
    return p * (1 - lr * wd) - lr * g / (np.abs(g) + eps)


@pytest.mark.parametrize("clip", [False, True])
def test_first_adamw_step_by_hand(dirs, batch, clip):
    """Unclipped: eps 1e-8, no decay. Clipped to a quarter of the norm: g -> c g with
    c = max_norm / (norm + 1e-6); with eps 1e-3 and decay 0.1 the step depends on c."""
    lr, eps, wd = 1e-2, (1e-3 if clip else 1e-8), (0.1 if clip else 0.0)
    backend = make(dirs["qwen2"], lora=LORA)
    nonzero_b(backend)
    backend.setup_optimizer(OptimizerSettings(weight_decay=wd, eps=eps))
    backend.forward_backward(batch, losses.get("tabpo").bind(), None, 1.0)
    before, grads = backend.trainable_state(), backend.gradients()
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    max_norm = norm / 4 if clip else None
    got_norm = backend.optimizer_step(lr, max_grad_norm=max_norm)
    assert np.isclose(got_norm, norm, rtol=1e-5), (got_norm, norm)
    c = max_norm / (norm + 1e-6) if clip else 1.0
    after = backend.trainable_state()
    for key in before:
        want = first_adam_step(before[key], c * grads[key], lr, eps, wd)
        assert_close(after[key], want, 2e-7, f"AdamW step of {key}")
    if clip:  # the check above would fail if clipping were skipped
        key = "model.layers.0.self_attn.q_proj.lora_A"
        unclipped = first_adam_step(before[key], grads[key], lr, eps, wd)
        assert np.abs(unclipped - after[key]).max() > 1e-5
    assert not any(np.any(g) for g in backend.gradients().values()), "gradients not cleared"


# -- 5. KL --------------------------------------------------------------------------------------


class KlRecorder:
    """An objective that keeps the KL arrays it is given and returns a constant loss."""

    needs_reference, needs_kl = True, True

    def __call__(self, pc, pr, rc, rr, cm, rm, cw, rw, chosen_kl=None, rejected_kl=None):
        self.kl = (np.array(chosen_kl), np.array(rejected_kl))
        return mx.sum(pc * cm, axis=-1) * 0.0, {}


def naive_kl(ref_logits, pol_logits, mask):
    """KL_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)) from position t - 1, on the mask."""
    lr, lp = log_softmax64(ref_logits), log_softmax64(pol_logits)
    kl = np.zeros(mask.shape)
    kl[:, 1:] = np.sum(np.exp(lr) * (lr - lp), axis=-1)[:, :-1]
    return kl * mask


def test_tdpo_kl_matches_full_vocabulary_kl(dirs, batch):
    """KL(pi_ref || pi_theta) per completion position against the base model's and the
    adapted model's full logits; its per-pair sums are TDPO's kl/* metrics; 0 when B = 0."""
    backend = make(dirs["qwen3"], lora=LORA)
    recorder = KlRecorder()
    backend.evaluate(batch, recorder, None)
    for kl in recorder.kl:
        assert np.abs(kl).max() < 1e-6, "KL of an adapter with B = 0 must vanish"
    nonzero_b(backend)
    base = plain_mlx(dirs["qwen3"])
    backend.evaluate(batch, recorder, None)
    want = [
        naive_kl(mlx_logits(base, ids), mlx_logits(backend.model, ids), m)
        for ids, m in sides(batch)
    ]
    for got, expected in zip(recorder.kl, want, strict=True):
        assert expected.max() > 1e-3
        assert_close(got, expected, 1e-5, "per-position KL")
    metrics = backend.evaluate(batch, losses.get("tdpo").bind(), None).metrics
    assert np.isclose(metrics["kl/chosen"], want[0].sum(-1).mean(), rtol=1e-5)
    assert np.isclose(metrics["kl/rejected"], want[1].sum(-1).mean(), rtol=1e-5)


def naive_objective_loss(model, base, batch, objective):
    """The objective on full-vocabulary log-softmaxes of ``model(ids)`` (B, T, V), with the
    reference and its KL from the base model's logits: no gathering, no scatter."""
    ids = [mx.array(batch.chosen_ids), mx.array(batch.rejected_ids)]
    masks = [mx.array(batch.chosen_mask), mx.array(batch.rejected_mask)]

    def shifted(x):  # value of token t from position t - 1, 0 at t = 0
        return mx.concatenate([mx.zeros_like(x[:, :1]), x[:, :-1]], axis=1)

    def side(x, m):
        logp = nn.log_softmax(model(x).astype(mx.float32), axis=-1)
        ref = mx.stop_gradient(nn.log_softmax(base(x).astype(mx.float32), axis=-1))
        tok = mx.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
        ref_tok = mx.take_along_axis(ref[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
        kl = shifted(mx.sum(mx.exp(ref) * (ref - logp), axis=-1))
        tok = mx.concatenate([mx.zeros_like(tok[:, :1]), tok], axis=1)
        ref_tok = mx.concatenate([mx.zeros_like(ref_tok[:, :1]), ref_tok], axis=1)
        return tok * m, ref_tok * m, kl * m

    (pc, rc, kc), (pr, rr, kr) = side(ids[0], masks[0]), side(ids[1], masks[1])
    cw, rw = mx.array(batch.chosen_weights), mx.array(batch.rejected_weights)
    per_pair, _ = objective(pc, pr, rc, rr, masks[0], masks[1], cw, rw, kc, kr)
    return mx.mean(per_pair)


def test_gradients_equal_naive_full_logits_loss(dirs, batch):
    """TDPO1 (gradient through the KL of both sides) and TAB-PO: the backend's gradients
    equal mx's gradient of the same objective written on full (B, T, V) log-softmaxes."""
    base = plain_mlx(dirs["llama"])
    for objective in (losses.get("tdpo").bind(variant="tdpo1"), losses.get("tabpo").bind()):
        backend = make(dirs["llama"], lora=LORA)
        nonzero_b(backend)
        result = backend.forward_backward(batch, objective, None, 1.0)
        loss, grads = nn.value_and_grad(
            backend.model,
            lambda b=backend, o=objective: naive_objective_loss(b.model, base, batch, o),
        )()
        assert result.loss == pytest.approx(loss.item(), rel=1e-5)
        want = {k: np.array(v) for k, v in tree_flatten(grads)}
        got = backend.gradients()
        for key, value in want.items():  # mlx lora_a (in, r) is canonical lora_A.T
            name = key.replace(".lora_a", ".lora_A").replace(".lora_b", ".lora_B")
            scale = np.abs(value).max()
            assert_close(got[name].T / scale, value / scale, 1e-5, f"gradient {key}")


def test_chunked_head_equals_one_chunk(dirs, batch, monkeypatch):
    """Seven rows per LM-head chunk give the same log-probs and KL as one chunk."""
    backend = make(dirs["qwen2-tied"], lora=LORA)
    nonzero_b(backend)
    recorder = KlRecorder()
    one = backend.logps(batch)
    backend.evaluate(batch, recorder, None)
    kl_one = recorder.kl
    head_chunk_rows(monkeypatch, dirs["qwen2-tied"], 7)
    many = backend.logps(batch)
    backend.evaluate(batch, recorder, None)
    for a, b in zip([*one, *kl_one], [*many, *recorder.kl], strict=True):
        assert_close(b, a, 1e-6, "chunked vs single-chunk head")


# -- 6. saved weights ---------------------------------------------------------------------------


def test_adapter_loads_in_mlx_lm(dirs, batch, tmp_path):
    backend = make(dirs["qwen2"], lora=LORA)
    nonzero_b(backend)
    backend.save_weights(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"]["scale"] == 2.0 and config["lora_parameters"]["rank"] == 4
    overrides = inspect_model_dir(dirs["qwen2"]).mlx_overrides()
    loaded, _ = mlx_load(str(dirs["qwen2"]), adapter_path=str(tmp_path), model_config=overrides)
    for got, want in zip(backend.logps(batch), oracle(loaded, batch), strict=True):
        assert_close(got, want, 1e-5, "adapter reloaded by mlx-lm")


def test_full_model_dir_loads_in_mlx_lm_without_overrides(dirs, batch, tmp_path):
    """qwen2: mlx-lm alone would assume tied embeddings and rope_theta 1e6; the saved
    config.json states both, so a plain ``mlx_lm.load(dir)`` rebuilds the trained model."""
    backend = make(dirs["qwen2"], finetune="full", keep_reference=False)
    backend.setup_optimizer(OptimizerSettings())
    ref = backend.logps(batch)
    backend.forward_backward(batch, losses.get("dpo").bind(), ref, 1.0)
    backend.optimizer_step(1e-3, None)
    backend.save_weights(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 20000.0
    assert (tmp_path / "tokenizer.json").is_file()
    loaded, _ = mlx_load(str(tmp_path))
    for got, want in zip(backend.logps(batch), oracle(loaded, batch), strict=True):
        assert_close(got, want, 1e-5, "full model reloaded by mlx-lm")


# -- 7. resume ----------------------------------------------------------------------------------


def test_resume_is_exact_with_dropout(dirs, pairs, tmp_path):
    """Two steps in one run == step 1, save, a fresh backend (other seed) + load_state,
    step 2: same loss, same weights; LoRA dropout 0.05 draws from the restored RNG key."""
    encoded, pad = pairs
    first, second = collate(encoded[:2], pad), collate(encoded[2:], pad)
    objective, lora = losses.get("tabpo").bind(), LoraSettings(rank=4, alpha=8.0, dropout=0.05)

    def step(backend, batch):
        loss = backend.forward_backward(batch, objective, None, 1.0).loss
        backend.optimizer_step(1e-2, 1.0)
        return loss

    run = make(dirs["llama"], lora=lora)
    run.setup_optimizer(OptimizerSettings(weight_decay=0.01))
    step(run, first)
    run.save_weights(tmp_path)
    run.save_state(tmp_path)
    want_loss = step(run, second)
    resumed = make(dirs["llama"], seed=123, lora=lora)
    resumed.setup_optimizer(OptimizerSettings(weight_decay=0.01))
    resumed.load_state(tmp_path)
    assert step(resumed, second) == pytest.approx(want_loss, abs=1e-7)
    want, got = run.trainable_state(), resumed.trainable_state()
    for key in want:
        assert_close(got[key], want[key], 1e-7, f"resumed weight {key}")
    losses_now = {resumed.forward_backward(second, objective, None, 1.0).loss for _ in range(2)}
    assert len(losses_now) == 2, "dropout was not active, so the RNG restore went untested"


# -- 8. bfloat16 --------------------------------------------------------------------------------


def test_bfloat16_close_to_float32(dirs, batch):
    """bf16 keeps ~3 significant digits: per-token log-probs (about -6.5 nats here; measured
    max 0.06, mean 0.016 nats) may move by 0.15 nats at worst and 0.04 on average.

    The base weights are bf16; LoRA factors stay float32 (as mlx-lm creates them and PEFT's
    autocast_adapter_dtype keeps them); an optimizer step changes no parameter's dtype,
    although gradients are summed in float32.
    """
    fp32 = make(dirs["llama"], lora=LORA).logps(batch)
    bf16 = make(dirs["llama"], lora=LORA, dtype="bfloat16")
    got = bf16.logps(batch)
    for g, w in zip(got, fp32, strict=True):
        assert g.dtype == np.float32 and np.all(np.isfinite(g))
        assert_close(g, w, 0.15, "bf16 vs fp32 log-probs")
        assert np.abs(g - w).sum() / np.count_nonzero(w) < 0.04
    full = make(dirs["llama"], finetune="full", dtype="bfloat16")
    dtypes = {}
    for name, backend in (("lora", bf16), ("full", full)):
        dtypes[name] = {k: v.dtype for k, v in tree_flatten(backend.model.parameters())}
        backend.setup_optimizer(OptimizerSettings())
        backend.forward_backward(batch, losses.get("tabpo").bind(), None, 1.0)
        backend.optimizer_step(1e-3, 1.0)
        after = {k: v.dtype for k, v in tree_flatten(backend.model.parameters())}
        assert after == dtypes[name], f"{name}: a step changed parameter dtypes"
        assert all(np.isfinite(v).all() for v in backend.trainable_state().values())
    assert set(dtypes["full"].values()) == {mx.bfloat16}
    lora = {k.rsplit(".", 1)[-1]: v for k, v in dtypes["lora"].items()}
    assert lora["lora_a"] == lora["lora_b"] == mx.float32 and lora["weight"] == mx.bfloat16


# -- 9. full fine-tuning references -------------------------------------------------------------


def test_full_finetuning_frozen_reference(dirs, batch):
    """The kept reference stays at the initial model while the policy moves."""
    backend = make(dirs["llama"], finetune="full")
    backend.setup_optimizer(OptimizerSettings())
    ref0, pol0 = backend.logps(batch, reference=True), backend.logps(batch)
    backend.forward_backward(batch, losses.get("dpo").bind(), None, 1.0)
    backend.optimizer_step(1e-2, None)
    ref1, pol1 = backend.logps(batch, reference=True), backend.logps(batch)
    for side in range(2):
        assert_close(ref0[side], pol0[side], 0.0, "policy and reference start equal")
        assert_close(ref1[side], ref0[side], 1e-7, "reference after a step")
        assert np.abs(pol1[side] - pol0[side]).max() > 1e-3, "the policy did not move"
    assert "lm_head.weight" in backend.trainable_state()


def test_full_finetuning_ref_path_and_precomputed(dirs, batch):
    """ref_path: the reference is that model; neither ref_path nor keep_reference: only
    precomputed reference log-probs are accepted."""
    backend = make(dirs["llama"], finetune="full", ref_path=str(dirs["llama-other"]))
    want = oracle(plain_mlx(dirs["llama-other"]), batch)
    for got, w in zip(backend.logps(batch, reference=True), want, strict=True):
        assert_close(got, w, 1e-5, "reference from ref_path")
    bare = make(dirs["llama"], finetune="full", keep_reference=False)
    with pytest.raises(TabpoError, match="precomputed"):
        bare.logps(batch, reference=True)
    with pytest.raises(TabpoError, match="precomputed"):
        bare.evaluate(batch, losses.get("dpo").bind(), None)
    result = bare.evaluate(batch, losses.get("dpo").bind(), bare.logps(batch))
    assert result.loss == pytest.approx(np.log(2.0), abs=1e-6)
