"""The PyTorch backend against oracles built from the model itself, never from the backend.

Log-probs and KL are checked against the model's own full logits in float64 (``naive_*``):

    l_t  = log_softmax(z_{t-1})[y_t]                       (m_t = 1, else 0)
    KL_t = sum_v p_ref(v | t-1) (log p_ref(v | t-1) - log p(v | t-1))

and the LoRA policy against a plain transformers model whose weights were merged by hand,
``W + (alpha / r) B A``. Tiny random models (the session's ``tiny_model``), float32, a few
ChatML pairs with JSON annotations. Failure messages print the max and mean difference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ANNOTATION, TINY_FAMILIES, head_chunk_rows

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tabpo import losses  # noqa: E402
from tabpo.backends.torch import TorchBackend  # noqa: E402
from tabpo.common.errors import TabpoError  # noqa: E402
from tabpo.data.batching import collate  # noqa: E402
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id  # noqa: E402
from tabpo.data.records import PreferenceExample  # noqa: E402
from tabpo.models.families import LORA_TARGETS  # noqa: E402
from tabpo.training.backend import (  # noqa: E402
    LoraSettings,
    ModelOptions,
    OptimizerSettings,
)

RANK, ALPHA = 4, 12.0  # scale 3, so a wrong scale shows
SCALE = ALPHA / RANK
SWAPPED = ANNOTATION.replace("build trust", "connection")
CUT = ANNOTATION.replace("your judgement", "your")
SDOH = '{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "rent is late"}]}'
PAIRS = [  # (user message, chosen, rejected): different lengths, so the batch is padded
    ("Annotate: I trust your judgement", ANNOTATION, SWAPPED),
    ("Annotate: I trust your judgement", ANNOTATION, CUT),
    ("Annotate: my rent is late", SDOH, '{"results": []}'),
    ("Annotate the message: Thank you doctor, I trust your judgement.", ANNOTATION, SDOH),
]


# -- fixtures and oracles -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tiny_model):
    tokenizer = load_tokenizer(tiny_model())
    examples = [
        PreferenceExample(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": user},
            ],
            chosen,
            rejected,
            line,
            conversational=False,
        )  # fmt: skip
        for line, (user, chosen, rejected) in enumerate(PAIRS, start=1)
    ]
    encoded, _ = encode_pairs(tokenizer, examples)
    return encoded, pad_id(tokenizer)


@pytest.fixture(scope="module")
def batch(pairs):
    encoded, pad = pairs
    return collate(encoded, pad)


def make(path, *, finetune="lora", dropout=0.0, targets=LORA_TARGETS, **options):
    backend = TorchBackend()
    backend.seed(0)
    lora = LoraSettings(rank=RANK, alpha=ALPHA, dropout=dropout, target_modules=targets)
    backend.load(ModelOptions(str(path), finetune=finetune, lora=lora, device="cpu", **options))
    return backend


def with_lora_b(backend, seed=1, std=0.1):
    """Make the adapter a real function: B ~ N(0, std) (peft starts it at 0)."""
    rng = np.random.default_rng(seed)
    state = backend.trainable_state()
    for name, value in state.items():
        if name.endswith("lora_B"):
            state[name] = rng.normal(0.0, std, value.shape).astype(np.float32)
    backend.load_trainable_state(state)
    return state


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def merged_model(path, state):
    """The base model with every adapter merged by hand: W <- W + (alpha / r) B A."""
    model = hf_model(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in state.items():
            if name.endswith("lora_A"):
                b = state[name.removesuffix("lora_A") + "lora_B"]
                weight = modules[name.removesuffix(".lora_A")].weight
                weight += torch.from_numpy(SCALE * (b.astype(np.float64) @ a)).float()
    return model


def sides(batch):
    return [
        (batch.chosen_ids, batch.chosen_attention_mask, batch.chosen_mask),
        (batch.rejected_ids, batch.rejected_attention_mask, batch.rejected_mask),
    ]


def full_log_softmax(model, ids, attention):
    """log_softmax of the model's own full logits, float64, (B, T, V); differentiable."""
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention))
    return out.logits.double().log_softmax(-1)


def naive_logps(model, batch, *, grad=False):
    """l[b, t] = log_softmax(z[b, t-1])[ids[b, t]] on the completion mask, 0 elsewhere;
    float64 NumPy, or torch tensors that carry a gradient with ``grad``."""
    out = []
    with torch.set_grad_enabled(grad):
        for ids, attention, mask in sides(batch):
            logsm = full_log_softmax(model, ids, attention)[:, :-1]
            picked = logsm.gather(-1, torch.from_numpy(ids[:, 1:, None]))[..., 0]
            lp = torch.nn.functional.pad(picked, (1, 0)) * torch.from_numpy(mask)
            out.append(lp if grad else lp.numpy())
    return out


def naive_kl(policy, reference, batch):
    """KL(p_ref || p) at every completion position, from full float64 distributions."""
    out = []
    for ids, attention, mask in sides(batch):
        with torch.no_grad():
            logp = full_log_softmax(policy, ids, attention)[:, :-1].numpy()
            ref = full_log_softmax(reference, ids, attention)[:, :-1].numpy()
        kl = np.zeros(ids.shape)
        kl[:, 1:] = (np.exp(ref) * (ref - logp)).sum(-1)
        out.append(kl * mask)
    return out


def close(got, want, what, atol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    assert diff.max(initial=0.0) <= atol, (
        f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"
    )


def states_close(got, want, what, rel, *, overall=False):
    """Each tensor within ``rel`` of the largest magnitude of its expected value (of all
    expected tensors together with ``overall``)."""
    assert sorted(got) == sorted(want), f"{what}: names differ"
    largest = max(np.abs(v).max() for v in want.values())
    for name in want:
        scale = max(largest if overall else np.abs(want[name]).max(), 1e-12)
        close(got[name], want[name], f"{what} {name}", atol=rel * scale)


class Spy:
    """An objective that records what the backend hands it, then delegates."""

    def __init__(self, objective):
        self.objective, self.seen = objective, None
        self.needs_reference, self.needs_kl = objective.needs_reference, objective.needs_kl

    def __call__(self, *args):
        self.seen = [None if a is None else a.detach().numpy().copy() for a in args]
        return self.objective(*args)


# -- 1. log-probs -------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logps_match_full_log_softmax(tiny_model, batch, family):
    """Policy (adapter B = 0) and reference both equal the base model's own log-probs."""
    path = tiny_model(family)
    backend = make(path)
    want = naive_logps(hf_model(path), batch)
    for reference in (False, True):
        got = backend.logps(batch, reference=reference)
        for side, g, w, mask in zip(("chosen", "rejected"), got, want, (batch.chosen_mask,
                                    batch.rejected_mask), strict=True):  # fmt: skip
            assert g.dtype == np.float32
            close(g, w, f"{family} {side} reference={reference}")
            assert np.all(g[mask == 0] == 0.0), "log-probs off the completion mask"


def test_reference_is_the_base_model_when_the_adapter_is_active(tiny_model, batch):
    """B != 0: the reference stays the base model, the policy is the merged model."""
    path = tiny_model()
    backend = make(path)
    state = with_lora_b(backend)
    base, merged = naive_logps(hf_model(path), batch), naive_logps(merged_model(path, state), batch)
    ref, policy = backend.logps(batch, reference=True), backend.logps(batch)
    for i, side in enumerate(("chosen", "rejected")):
        close(ref[i], base[i], f"reference {side}")
        close(policy[i], merged[i], f"policy {side} vs W + (alpha/r) B A")
        assert np.abs(policy[i] - base[i]).max() > 1e-2, "the adapter changed nothing"


# -- 2. LoRA structure --------------------------------------------------------------------


def test_lora_wraps_every_layer_and_projection(tiny_model):
    from peft.tuners.lora import LoraLayer

    backend = make(tiny_model(), dropout=0.05)
    wrapped = {n: m for n, m in backend.model.named_modules() if isinstance(m, LoraLayer)}
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert {n.removeprefix("base_model.model.") for n in wrapped} == expected
    state = backend.trainable_state()
    assert len(state) == 2 * len(expected)
    for name, module in wrapped.items():
        assert module.r["default"] == RANK
        assert module.scaling["default"] == pytest.approx(SCALE)
        assert module.lora_dropout["default"].p == 0.05
        canonical = name.removeprefix("base_model.model.")
        base = module.base_layer
        assert state[f"{canonical}.lora_A"].shape == (RANK, base.in_features)
        assert state[f"{canonical}.lora_B"].shape == (base.out_features, RANK)


def test_unknown_target_module_is_named(tiny_model):
    with pytest.raises(TabpoError, match=r"'xyz_proj' is not in the model.*q_proj"):
        make(tiny_model(), targets=("q_proj", "xyz_proj"))


def test_bad_directory_and_state_are_refused(tiny_model, tmp_path):
    with pytest.raises(TabpoError, match="config.json"):
        make(tmp_path)
    backend = make(tiny_model())
    state = backend.trainable_state()
    name = next(iter(state))
    with pytest.raises(TabpoError, match="missing"):
        backend.load_trainable_state({k: v for k, v in state.items() if k != name})
    with pytest.raises(TabpoError, match="unknown"):
        backend.load_trainable_state({**state, "model.extra.lora_A": state[name]})
    with pytest.raises(TabpoError, match="shape"):
        backend.load_trainable_state({**state, name: state[name].T})


# -- 3. steps and gradient accumulation ---------------------------------------------------


def test_step_result_is_the_objective_on_the_logps(tiny_model, batch):
    """No dropout: loss = mean of the objective applied (in NumPy) to logps() and the
    reference logps; a precomputed reference gives the same loss and gradients."""
    objective = losses.get("tabpo").bind()
    on_the_fly, given = make(tiny_model()), make(tiny_model())
    for backend in (on_the_fly, given):
        with_lora_b(backend)
    ref = on_the_fly.logps(batch, reference=True)
    masks = (batch.chosen_mask, batch.rejected_mask, batch.chosen_weights, batch.rejected_weights)
    per_pair, _ = objective(*on_the_fly.logps(batch), *ref, *masks)
    result = on_the_fly.forward_backward(batch, objective, None, 1.0)
    close(result.per_pair, per_pair, "per-pair loss", atol=1e-5)
    assert result.loss == pytest.approx(float(np.mean(result.per_pair)), rel=1e-6)
    attention = batch.chosen_attention_mask.sum() + batch.rejected_attention_mask.sum()
    assert result.tokens == int(attention)
    assert {"rewards/chosen", "rewards/margins"} <= set(result.metrics)
    assert all(isinstance(v, float) for v in result.metrics.values())
    evaluated = on_the_fly.evaluate(batch, objective, ref)
    assert evaluated.loss == pytest.approx(result.loss, rel=1e-6)
    assert given.forward_backward(batch, objective, ref, 1.0).loss == pytest.approx(
        result.loss, rel=1e-6
    )
    states_close(given.gradients(), on_the_fly.gradients(), "precomputed ref grad", rel=1e-6)


@pytest.mark.parametrize("loss", ["tabpo", "dpo"])
def test_gradient_accumulation_matches_one_batch(tiny_model, pairs, loss):
    """Two halves at scale 0.5 accumulate the gradient of the whole batch at scale 1:
    grad mean_4 = 0.5 grad mean_2 (first) + 0.5 grad mean_2 (second).

    float32: the halves run in other padded shapes, so sums over ~200 tokens round
    differently (up to ~2.5e-6 of the largest gradient on these models); tolerance 5e-6. A lost
    scale or an overwritten gradient is off by tens of percent."""
    encoded, pad = pairs
    objective = losses.get(loss).bind()
    whole, halves = make(tiny_model()), make(tiny_model())
    for backend in (whole, halves):
        with_lora_b(backend)
    whole.forward_backward(collate(encoded, pad), objective, None, 1.0)
    for part in (encoded[:2], encoded[2:]):
        halves.forward_backward(collate(part, pad), objective, None, 0.5)
    grads = whole.gradients()
    assert all(np.abs(g).max() > 0 for g in grads.values()), "a zero gradient proves nothing"
    states_close(halves.gradients(), grads, f"{loss} accumulated grad", rel=5e-6, overall=True)


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])
def test_gradients_match_float64_autograd(tiny_model, batch, tmp_path, monkeypatch, loss):
    """The gradient through the gathered, chunked, checkpointed LM head (and, for TDPO1,
    through both KLs) equals float64 autograd through the full log_softmax of the same
    adapter loaded by peft. Chunks of 7 rows, so there are many of them and a remainder."""
    from peft import PeftModel

    hparams = {"beta": 0.5, **({"variant": "tdpo1"} if loss == "tdpo" else {})}
    path, objective = tiny_model(), losses.get(loss).bind(**hparams)
    head_chunk_rows(monkeypatch, path, 7)
    backend = make(path)
    with_lora_b(backend)
    backend.forward_backward(batch, objective, None, 1.0)
    backend.save_weights(tmp_path)
    oracle = PeftModel.from_pretrained(hf_model(path).double(), str(tmp_path), is_trainable=True)
    oracle = oracle.double().eval()
    pc, pr = naive_logps(oracle, batch, grad=True)
    with oracle.disable_adapter():
        rc, rr = (torch.from_numpy(x) for x in naive_logps(oracle, batch))
    kl = oracle_kl(oracle, batch) if objective.needs_kl else (None, None)
    masks = (batch.chosen_mask, batch.rejected_mask, batch.chosen_weights, batch.rejected_weights)
    per_pair, _ = objective(pc, pr, rc, rr, *(torch.from_numpy(m).double() for m in masks), *kl)
    per_pair.mean().backward()
    want = {
        n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight"):
        p.grad.numpy()
        for n, p in oracle.named_parameters() if p.requires_grad
    }  # fmt: skip
    # float32 accumulation through the backward: up to ~1.1e-5 of a small tensor's own scale
    # (k_proj's B on this batch), so 2e-5 per tensor
    states_close(backend.gradients(), want, f"{loss} gradient vs float64 autograd", rel=2e-5)


def oracle_kl(peft_model, batch):
    """Differentiable float64 KL(p_ref || p), the reference being the adapter switched off."""
    out = []
    for ids, attention, mask in sides(batch):
        with peft_model.disable_adapter(), torch.no_grad():
            ref = full_log_softmax(peft_model, ids, attention)[:, :-1]
        logp = full_log_softmax(peft_model, ids, attention)[:, :-1]
        kl = (ref.exp() * (ref - logp)).sum(-1)
        out.append(torch.nn.functional.pad(kl, (1, 0)) * torch.from_numpy(mask))
    return out


# -- 4. the optimizer ---------------------------------------------------------------------


def test_first_adamw_step_and_clipping(tiny_model, batch):
    """First AdamW step from zero state, bias-corrected (torch.optim.AdamW):

        theta <- theta (1 - lr wd)
        m = (1 - b1) g, v = (1 - b2) g^2;  m^ = m / (1 - b1) = g,  v^ = v / (1 - b2) = g^2
        theta <- theta - lr m^ / (sqrt(v^) + eps) = theta - lr g / (|g| + eps)

    Clipping to c = max_norm / (||g|| + 1e-6) replaces g by c g. As the step is nearly
    scale-free, eps is set near the typical |g| so clipping visibly changes the update.
    """
    lr, wd, objective = 1e-2, 0.1, losses.get("dpo").bind()
    probe = make(tiny_model())
    with_lora_b(probe)
    probe.forward_backward(batch, objective, None, 1.0)
    g = probe.gradients()
    norm = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values()))
    eps = float(np.median(np.abs(np.concatenate([v.ravel() for v in g.values()]))))
    for max_norm in (None, norm / 4):
        backend = make(tiny_model())
        theta = with_lora_b(backend)
        backend.setup_optimizer(OptimizerSettings(weight_decay=wd, eps=eps))
        backend.forward_backward(batch, objective, None, 1.0)
        assert backend.optimizer_step(lr, max_norm) == pytest.approx(norm, rel=1e-5)
        c = 1.0 if max_norm is None else max_norm / (norm + 1e-6)
        want = {k: theta[k] * (1 - lr * wd) - lr * c * g[k] / (c * np.abs(g[k]) + eps)
                for k in theta}  # fmt: skip
        states_close(backend.trainable_state(), want, f"AdamW max_norm={max_norm}", rel=1e-5)
        assert all(np.all(v == 0) for v in backend.gradients().values()), "grads not zeroed"
    unclipped = {k: theta[k] * (1 - lr * wd) - lr * g[k] / (np.abs(g[k]) + eps) for k in theta}
    gap = max(np.abs(unclipped[k] - want[k]).max() for k in theta)
    assert gap > 1e-4, "clipping made no difference: the check above proves nothing"


# -- 5. TDPO's KL -------------------------------------------------------------------------


def test_tdpo_kl_matches_full_vocabulary_kl(tiny_model, batch, monkeypatch):
    """Chunks of 7 rows: the chunked KL is stitched back in the right order."""
    path = tiny_model()
    head_chunk_rows(monkeypatch, path, 7)
    spy = Spy(losses.get("tdpo").bind())
    noop = make(path)
    noop.evaluate(batch, spy, None)
    for i in (8, 9):
        close(spy.seen[i], np.zeros_like(spy.seen[i]), "KL of a no-op adapter", atol=1e-6)

    backend = make(path)
    state = with_lora_b(backend)
    backend.evaluate(batch, spy, None)
    want = naive_kl(merged_model(path, state), hf_model(path), batch)
    base = naive_logps(hf_model(path), batch)
    for i, side in enumerate(("chosen", "rejected")):
        close(spy.seen[8 + i], want[i], f"KL {side}")
        close(spy.seen[2 + i], base[i], f"reference {side} handed to tdpo")
    assert min(w.max() for w in want) > 1e-3, "the KL is too small to test anything"

    backend.forward_backward(batch, spy, None, 1.0)  # the KL's gradient reaches the adapter
    close(spy.seen[8], want[0], "KL in train mode (no dropout)")
    grads = backend.gradients()
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in grads.values())


# -- 6. saved weights ---------------------------------------------------------------------


def test_saved_adapter_loads_in_peft(tiny_model, batch, tmp_path):
    from peft import PeftModel

    path = tiny_model()
    backend = make(path)
    with_lora_b(backend)
    backend.save_weights(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    loaded = PeftModel.from_pretrained(hf_model(path), str(tmp_path)).eval()
    for got, want, side in zip(backend.logps(batch), naive_logps(loaded, batch),
                               ("chosen", "rejected"), strict=True):  # fmt: skip
        close(got, want, f"peft-loaded adapter {side}")


def test_saved_full_model_loads_in_transformers(tiny_model, batch, tmp_path):
    """Tied embeddings: no separate lm_head.weight is trained or needed."""
    backend = make(tiny_model("qwen2", tie=True), finetune="full", keep_reference=False)
    state = backend.trainable_state()
    assert "lm_head.weight" not in state
    rng = np.random.default_rng(2)
    backend.load_trainable_state({k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
                                  for k, v in state.items()})  # fmt: skip
    backend.save_weights(tmp_path)
    for got, want, side in zip(backend.logps(batch), naive_logps(hf_model(tmp_path), batch),
                               ("chosen", "rejected"), strict=True):  # fmt: skip
        close(got, want, f"saved full model {side}")
    assert load_tokenizer(tmp_path).eos_token == "<|im_end|>"


# -- 7. exact resume ----------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_repeats_the_next_step_exactly(tiny_model, batch, tmp_path, finetune):
    """Step 2 after save/load equals step 2 of the uninterrupted run: weights, AdamW moments
    and, with LoRA dropout 0.05, the dropout masks (the RNG). A run that reseeds instead
    of restoring the RNG gives another loss, so the RNG restore is what is tested."""
    objective = losses.get("tabpo").bind()

    def step(backend):
        loss = backend.forward_backward(batch, objective, None, 1.0).loss
        backend.optimizer_step(1e-2, 1.0)
        return loss

    def fresh():
        backend = make(tiny_model(), finetune=finetune, dropout=0.05)
        backend.setup_optimizer(OptimizerSettings(weight_decay=0.01))
        return backend

    first = fresh()
    step(first)
    first.save_weights(tmp_path)
    first.save_state(tmp_path)
    loss, state = step(first), first.trainable_state()

    second = fresh()
    second.load_state(tmp_path)
    assert step(second) == pytest.approx(loss, abs=1e-7)
    states_close(second.trainable_state(), state, "weights after the resumed step", rel=1e-7)
    if finetune == "lora":
        reseeded = fresh()
        reseeded.load_state(tmp_path)
        reseeded.seed(123)
        assert abs(step(reseeded) - loss) > 1e-6, "dropout did not matter"


# -- 8. bfloat16 --------------------------------------------------------------------------


def test_bfloat16_is_close_to_float32(tiny_model, batch):
    """bf16 keeps ~3 significant digits: on this tiny model per-token log-probs move by a
    few hundredths of a nat (torch bf16 against its own float32: ~0.007 nats per sequence
    on a tiny model); tolerance 0.1 per token, 0.02 on average."""
    path = tiny_model()
    bf16 = make(path, dtype="bfloat16")
    assert next(bf16.model.get_base_model().parameters()).dtype == torch.bfloat16
    for got, want in zip(bf16.logps(batch), make(path).logps(batch), strict=True):
        assert got.dtype == np.float32 and np.isfinite(got).all()
        diff = np.abs(got - want)
        assert diff.max() < 0.1 and diff.mean() < 0.02, (
            f"bf16 vs fp32: max diff {diff.max():.3g}, mean {diff.mean():.3g}"
        )


# -- 9. full fine-tuning references -------------------------------------------------------


def test_full_finetuning_keeps_a_frozen_reference(tiny_model, batch):
    path = tiny_model()
    backend = make(path, finetune="full")
    assert "lm_head.weight" in backend.trainable_state()  # untied
    initial = naive_logps(hf_model(path), batch)
    backend.setup_optimizer(OptimizerSettings())
    backend.forward_backward(batch, losses.get("dpo").bind(), None, 1.0)
    backend.optimizer_step(1e-3, None)
    ref, policy = backend.logps(batch, reference=True), backend.logps(batch)
    for i, side in enumerate(("chosen", "rejected")):
        close(ref[i], initial[i], f"reference {side} after a step")
        assert np.abs(policy[i] - initial[i]).max() > 1e-3, "the policy did not move"


def test_full_finetuning_reference_from_ref_path(tiny_model, batch):
    other = tiny_model(seed=5)
    backend = make(tiny_model(), finetune="full", ref_path=str(other))
    for got, want in zip(backend.logps(batch, reference=True), naive_logps(hf_model(other), batch),
                         strict=True):  # fmt: skip
        close(got, want, "reference from ref_path")


def test_full_finetuning_without_reference_needs_it_precomputed(tiny_model, batch):
    """No reference model: the reference is the initial policy, whose log-probs the core
    precomputes (``tabpo.training.reference``); asking the backend for the reference is an
    error before the first step as after it, and a step needs the precomputed log-probs."""
    backend = make(tiny_model(), finetune="full", keep_reference=False)
    with pytest.raises(TabpoError, match="precomputed"):
        backend.logps(batch, reference=True)
    ref = backend.logps(batch)
    backend.setup_optimizer(OptimizerSettings())
    dpo = losses.get("dpo").bind()
    backend.forward_backward(batch, dpo, ref, 1.0)
    backend.optimizer_step(1e-3, None)
    with pytest.raises(TabpoError, match="precomputed"):
        backend.logps(batch, reference=True)
    with pytest.raises(TabpoError, match="precomputed"):
        backend.forward_backward(batch, dpo, None, 1.0)
    assert np.isfinite(backend.forward_backward(batch, dpo, ref, 1.0).loss)
    assert np.isfinite(backend.forward_backward(batch, losses.get("simpo").bind(), None, 1.0).loss)


def test_no_accelerator_peak_on_the_cpu(tiny_model):
    """On the CPU the process's resident set is the memory figure (the core's), not
    an allocator's."""
    assert make(tiny_model()).peak_accelerator_memory_gb() is None


def test_float16_full_finetuning_on_cuda_is_refused_before_loading(tiny_model, monkeypatch):
    from tabpo.backends import _torch_load

    monkeypatch.setattr(_torch_load, "pick_device", lambda requested: torch.device("cuda"))
    with pytest.raises(TabpoError, match="float16 full fine-tuning on CUDA needs loss scaling"):
        make(tiny_model(), finetune="full", dtype="float16")
