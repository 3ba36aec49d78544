"""Greedy answers to prompts, on any backend: render, batch, decode, stop at end of turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tabpo.data.records import Message
from tabpo.data.templates import render, stop_ids
from tabpo.training.backend import Backend


def prompt_ids(tokenizer: Any, prompt: list[Message]) -> list[int]:
    """The prompt as the trainer sees it (chat template with the generation prompt, or the
    plain concatenation the encoder uses without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = render(tokenizer, prompt, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in prompt)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def generate(
    backend: Backend,
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The greedy answer to every prompt, decoded without special tokens."""
    stops = stop_ids(tokenizer)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    # similar lengths together: less padding per batch; answers go back in input order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = backend.generate([encoded[i] for i in chunk], max_new_tokens=max_new_tokens,
                                   stop_ids=stops)  # fmt: skip
        for i, ids in zip(chunk, outputs, strict=True):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
        if progress is not None:
            progress(len(chunk))
    return answers
