"""Greedy decoding on the MLX backend: mlx-lm's ``BatchGenerator`` (batched, KV cache)."""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.generate import BatchGenerator


def greedy(
    model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int]
) -> list[list[int]]:
    """The greedy continuation of every prompt, without its stop token."""
    generator = BatchGenerator(
        model,
        max_tokens=max_new_tokens,
        stop_tokens=[[t] for t in stop_ids],
        completion_batch_size=max(len(prompts), 1),
        prefill_batch_size=max(len(prompts), 1),
    )
    try:
        uids = generator.insert(prompts, [max_new_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(int(r.token))
    finally:
        generator.close()
    return [tokens[uid] for uid in uids]
