"""The shared-prefix (forked) forward computes what the separate forward computes.

Two kinds of evidence. The layout itself, against an oracle that knows nothing of its
formulas: every query row of the forked sequence must see exactly the tokens, at exactly
the positions, that the same token sees in its own side's plain sequence, and every target
must be predicted from the row that ends that side's context. Then both backends: per-token
log-probs, losses and LoRA gradients of the forked forward equal the plain (2B, T) forward's
to 1e-5 (float32), on pairs that share a long completion prefix, pairs that share only the
prompt (diverging at the first completion token), identical completions of different
length (either side a prefix of the other), and prompts of different lengths in one batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from tabpo import losses
from tabpo.backends import get_backend
from tabpo.common.errors import TabpoError
from tabpo.data.batching import collate
from tabpo.data.encoding import EncodedPair
from tabpo.data.layout import fork_layout, fork_mask, layout, plain_layout
from tabpo.training.backend import LoraSettings, ModelOptions

REL = 1e-5
PAD = 0


def pair(index, prompt, chosen, rejected):
    weights = [np.linspace(1.0, 2.0, len(c)).astype(np.float32) for c in (chosen, rejected)]
    return EncodedPair(index, index + 1, list(prompt), list(chosen), list(rejected), *weights)


def cases(vocab=300, seed=0):
    """The pairs of one batch, one per shape of shared prefix named in the module docstring."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(5, vocab, n).tolist()

    completion = ids(12)
    swapped = list(completion)
    swapped[7] = completion[7] + 1 if completion[7] + 1 < vocab else 5
    return [
        pair(0, ids(20), completion, swapped),  # a label swapped mid-completion
        pair(1, ids(9), ids(6), ids(8)),  # only the prompt is shared
        pair(2, ids(14), completion[:5], completion),  # chosen a prefix of rejected
        pair(3, ids(3), completion, completion[:9]),  # rejected a prefix of chosen
    ]


# -- the layout, against an oracle ------------------------------------------------------


def visible(lay, row, query):
    """(position, id) of every key forked row ``row``'s token ``query`` attends to."""
    mask = fork_mask(lay.segments, np.arange(lay.ids.shape[1]))[row, query]
    keys = np.flatnonzero(mask)
    return [(int(lay.positions[row, k]), int(lay.ids[row, k])) for k in keys]


def check_fork(pairs):
    batch = collate(pairs, PAD)
    fork, plain = fork_layout(batch), plain_layout(batch)
    width, n = batch.chosen_ids.shape[1], batch.size
    assert fork.shape == plain.shape == (2 * n, width)
    for row in range(n):  # every real token sees its own side's prefix, in order
        sides = {1: batch.chosen_ids[row], 2: batch.rejected_ids[row]}
        for i in np.flatnonzero(fork.attention[row]):
            seg, pos = int(fork.segments[row, i]), int(fork.positions[row, i])
            side = sides[2 if seg == 2 else 1]
            want = [(p, int(side[p])) for p in range(pos + 1)]
            assert visible(fork, row, i) == want, f"pair {row} token {i} (segment {seg})"
    # targets: the same (out index, target id) set as the plain layout, each predicted from
    # a row whose context is the plain context of that token
    got = {}
    for k, out in enumerate(fork.targets.out_index.tolist()):
        u = fork.targets.source[k]
        r, i = divmod(int(fork.targets.hidden_index[u]), fork.ids.shape[1])
        side, t = divmod(out, width)
        plain_ids = (batch.chosen_ids if side < n else batch.rejected_ids)[side % n]
        assert r == side % n
        assert visible(fork, r, i) == [(p, int(plain_ids[p])) for p in range(t)], (side, t)
        got[out] = int(fork.targets.target_ids[u])
    want = dict(
        zip(plain.targets.out_index.tolist(), plain.targets.target_ids.tolist(), strict=True)
    )
    assert got == want
    return fork, plain


def test_fork_layout_matches_the_separate_sequences():
    fork, plain = check_fork(cases())
    assert fork.tokens < plain.tokens
    # pair 0 shares 20 + 7 tokens: its row holds 20 + 12 + 5 of the plain 2 x 32
    assert int(fork.attention[0].sum()) == 37
    # the shared completion tokens go through the LM head once
    assert len(fork.targets.hidden_index) < len(fork.targets.out_index)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fork_layout_property(data):
    pairs = []
    for index in range(data.draw(st.integers(1, 4))):
        token = st.integers(1, 6)  # a small alphabet: long shared prefixes are common
        prompt = data.draw(st.lists(token, min_size=1, max_size=6))
        chosen = data.draw(st.lists(token, min_size=1, max_size=6))
        rejected = data.draw(st.lists(token, min_size=1, max_size=6))
        pairs.append(pair(index, prompt, chosen, rejected))
    check_fork(pairs)


def test_auto_forks_only_when_it_saves_work():
    batch = collate(cases(), PAD)
    assert layout(batch, "auto").forked and layout(batch, "on").forked
    assert not layout(batch, "off").forked
    rng = np.random.default_rng(1)  # completions that differ at once, prompts of 2 tokens
    short = [pair(i, [7, 8], rng.integers(5, 99, 30).tolist(), rng.integers(5, 99, 30).tolist())
             for i in range(3)]  # fmt: skip
    assert not layout(collate(short, PAD), "auto").forked
    assert layout(collate(short, PAD), "on").forked
    with pytest.raises(ValueError, match="prefix sharing must be one of"):
        layout(batch, "always")


def test_completion_only_batches_are_never_forked():
    example = EncodedPair(0, 1, [5, 6, 7], [8, 9], None, np.ones(2, np.float32), None)
    assert not layout(collate([example], PAD), "on").forked


# -- both backends ----------------------------------------------------------------------


def close(a, b, what, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.linalg.norm(a - b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)
    assert diff <= rel * scale, (
        f"{what}: forked vs plain relative diff {diff / scale:.3g} "
        f"(max abs {np.abs(a - b).max():.3g}, tolerance {rel})"
    )


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def loaded(name, model_dir, sharing):
    backend = get_backend(name)
    backend.seed(0)
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0)
    backend.load(ModelOptions(str(model_dir), lora=lora, prefix_sharing=sharing))
    rng = np.random.default_rng(0)  # a non-zero adapter, the same on both layouts
    state = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in backend.trainable_state().items()}  # fmt: skip
    backend.load_trainable_state(state)
    return backend


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_forked_forward_equals_separate_forward(backend_name, model_dir):
    batch = collate(cases(vocab=300), PAD)
    assert layout(batch, "on").forked
    fork, plain = loaded(backend_name, model_dir, "on"), loaded(backend_name, model_dir, "off")
    for reference in (False, True):
        got, want = fork.logps(batch, reference=reference), plain.logps(batch, reference=reference)
        for side, a, b in zip(("chosen", "rejected"), got, want, strict=True):
            close(a, b, f"{backend_name} {side} log-probs (reference={reference})")
            assert np.array_equal(a != 0, b != 0)
    for name in ("tabpo", "dpo", "tdpo"):  # tdpo: the reference's rows and KL, forked too
        objective = losses.get(name).bind()
        for b in (fork, plain):
            b.zero_grad()
        rf = fork.forward_backward(batch, objective, None, scale=1.0)
        rp = plain.forward_backward(batch, objective, None, scale=1.0)
        close(rf.per_pair, rp.per_pair, f"{backend_name} {name} per-pair loss")
        assert rf.tokens == rp.tokens == batch.tokens
        gf, gp = fork.gradients(), plain.gradients()
        assert np.linalg.norm(np.concatenate([g.ravel() for g in gp.values()])) > 0
        for key in gp:
            close(gf[key], gp[key], f"{backend_name} {name} gradient {key}", rel=1e-4)
        flat = [np.concatenate([g[k].ravel() for k in sorted(g)]) for g in (gf, gp)]
        close(*flat, f"{backend_name} {name} gradient (all parameters)")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_torch_fork_mask_for_each_attention_implementation(model_dir, implementation):
    """sdpa takes the boolean fork mask, eager the additive one: both give the plain
    layout's log-probs; an attention that takes no mask never forks."""
    import torch
    from transformers import AutoModelForCausalLM

    from tabpo.backends._torch_load import fork_mask_kind
    from tabpo.backends._torch_logps import DeviceBatch, completion_hidden, token_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=implementation)
    sharing, kind = fork_mask_kind(model, "on")
    assert (sharing, kind) == ("on", "bool" if implementation == "sdpa" else "additive")
    batch = collate(cases(), PAD)
    got = []
    with torch.no_grad():
        for mode in ("on", "off"):
            inputs = DeviceBatch(batch, torch.device("cpu"), mode, kind)
            rows = completion_hidden(model, inputs)
            head = model.get_output_embeddings()
            got.append([x.numpy() for x in inputs.sides(token_logps(rows, head, inputs.target))])
    for side, a, b in zip(("chosen", "rejected"), *got, strict=True):
        close(a, b, f"torch {implementation} {side} log-probs")
    model.config._attn_implementation = "flash_attention_2"
    assert fork_mask_kind(model, "auto") == ("off", None)
    with pytest.raises(TabpoError, match="needs sdpa or eager attention"):
        fork_mask_kind(model, "on")


def test_mlx_fork_refuses_a_sliding_window_in_one_line():
    """mlx-lm asks the cache for a windowed mask on sliding-window layers; the forked
    forward has none, which is a TabpoError (one line), not a NotImplementedError."""
    mx = pytest.importorskip("mlx.core")
    from tabpo.backends._mlx_logps import _ForkCache

    cache = _ForkCache(mx.ones((1, 1, 4, 4), dtype=mx.bool_))
    assert cache.make_mask(4) is cache.mask
    with pytest.raises(TabpoError, match="sliding-window attention.*--prefix-sharing off"):
        cache.make_mask(4, window_size=2)
