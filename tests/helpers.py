"""Test helpers shared across test modules (imported as ``helpers``; tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ANNOTATION = (
    '{"results": [{"Code": "PartnershipPatient", "Sub-code": "build trust", '
    '"Span": "I trust your judgement"}]}'
)
CORPUS = [
    ANNOTATION,
    '{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "rent is late"}]}',
    '{"Code": "PartnershipProvider", "Sub-code": "connection", "Span": "happy to help"}',
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Annotate the message: Thank you doctor, I trust your judgement.\n\n\n",
]


def build_chatml_tokenizer(directory: str | Path | None = None):
    """A tiny byte-level BPE tokenizer with a ChatML chat template, trained here (no download).

    eos is ``<|im_end|>`` (the end-of-turn token, as in Qwen's instruct models), pad is
    ``<|endoftext|>``, there is no BOS. When `directory` is given the tokenizer is saved there
    with ``save_pretrained`` so it can be loaded back with AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


TINY_FAMILIES = ("llama", "qwen2", "qwen3")


def build_tiny_model(
    directory: str | Path,
    family: str = "llama",
    *,
    tie: bool = False,
    layers: int = 2,
    seed: int = 0,
    rope_theta: float | None = None,
):
    """A tiny random HF causal LM (float32) plus the ChatML tokenizer, saved to `directory`.

    rope_theta defaults to a value neither stack assumes (llama 50000, qwen 20000) so a
    loader that ignores config.json's nested rope settings builds a different function.
    Returns the directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = build_chatml_tokenizer(directory)
    theta = rope_theta or (50000.0 if family in ("llama", "mistral") else 20000.0)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rope_theta=theta,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init so log-probs are far from uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    return directory


SUBCODES = [("PartnershipPatient", "build trust", "connection"),
            ("PartnershipPatient", "alignment", "statePreferences"),
            ("SDOH", "EconomicStability", "SocialAndCommunityContext"),
            ("PartnershipProvider", "salutation", "signoff")]  # fmt: skip
SPANS = ["I trust your judgement", "rent is late", "happy to help", "thank you doctor"]


def write_pairs(path: str | Path, n: int = 8, *, seed: int = 0) -> Path:
    """``n`` annotation pairs (standard form) whose rejected swaps a sibling sub-code."""
    import json
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        code, good, bad = SUBCODES[i % len(SUBCODES)]
        span = rng.choice(SPANS)

        def answer(sub: str, code: str = code, span: str = span) -> str:
            item = {"Code": code, "Sub-code": sub, "Span": span}
            return json.dumps({"results": [item]}, separators=(", ", ": "))

        rows.append({"prompt": f"Annotate message {i}: {span}.", "chosen": answer(good),
                     "rejected": answer(bad)})  # fmt: skip
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_completions(path: str | Path, n: int = 8, *, seed: int = 0) -> Path:
    """``n`` prompt/completion records (SFT data): the chosen answers of ``write_pairs``."""
    import json

    pairs = write_pairs(Path(path).with_suffix(".pairs.jsonl"), n, seed=seed)
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]})
                            + "\n" for r in rows))  # fmt: skip
    return path


def head_chunk_rows(monkeypatch, model_dir, rows: int) -> None:
    """Make the LM head of a model of ``model_dir`` run ``rows`` rows per chunk."""
    from tabpo.data import layout

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(layout, "LOGITS_PER_CHUNK", rows * vocab)


def adam_close(a, b, *, lr, steps, what, tol=1e-5):
    """Weights after AdamW steps from gradients that agree to float32 precision: AdamW moves
    a weight by about lr * m / sqrt(v) whatever the gradient's size, so where a gradient is
    at the level of float32 noise its move is noise too (up to lr a step). All weights but
    a handful (2, or 0.1% of a large tensor) agree to ``tol``; none moved apart by more
    than lr per step."""
    import numpy as np

    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    off = int((diff > tol).sum())
    assert off <= max(2, diff.size // 1000) and diff.max() <= lr * steps, (
        f"{what}: {off} of {diff.size} weights differ by more than {tol}, the most by "
        f"{diff.max():.3g} (lr {lr} x {steps} steps)"
    )
