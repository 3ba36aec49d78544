"""Greedy decoding with a KV cache on both backends equals a naive argmax loop."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model

from tabpo.backends import get_backend
from tabpo.data.encoding import load_tokenizer
from tabpo.training.backend import ModelOptions
from tabpo.training.generation import generate, prompt_ids, stop_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


def naive_greedy(model_dir, prompt, max_new, stops):
    """Full forward of the whole sequence at every step (no cache, no batching), argmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_batched_cached_greedy_equals_naive(backend, model_dir):
    tokenizer = load_tokenizer(model_dir)
    prompts = [
        [{"role": "user", "content": text}]
        for text in ("Annotate: I trust your judgement.", "Hi", "rent is late, thank you doctor")
    ]
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    assert len({len(e) for e in encoded}) == 3  # different lengths: padding is exercised
    stops = stop_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    impl = get_backend(backend)
    impl.load(ModelOptions(path=str(model_dir), finetune="full"))
    got = impl.generate(encoded, max_new_tokens=12, stop_ids=stops)
    want = [naive_greedy(model_dir, e, 12, stops) for e in encoded]
    assert got == want
    texts = generate(impl, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert texts == [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    # a stop token ends each answer where it first appears, and is not part of it
    stop = want[0][2]
    cut = impl.generate(encoded, max_new_tokens=12, stop_ids=[stop])
    assert cut == [w[: w.index(stop)] if stop in w else w for w in want]
