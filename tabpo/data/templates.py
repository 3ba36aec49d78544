"""The chat template as training and generation both use it: how a conversation is rendered
and which tokens end a turn.

Two things a template may do on its own are pinned, so that training sees what inference
sees and the same data always gives the same token ids (``TEMPLATE_VARIABLES``):

- Qwen3's template puts an empty think block before the answer of an assistant turn, which
  the default generation prompt never produces: rendering with ``enable_thinking=False``
  moves it into the generation prompt, so it is part of the prompt at training and at
  inference and the completion is the answer alone;
- Llama 3's template writes today's date into the system prompt: ``date_string`` pins it,
  so token ids, and the reference cache keyed by them, do not change from day to day.

A template ignores variables it does not use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabpo.common.errors import DataError

TEMPLATE_VARIABLES: dict[str, Any] = {"enable_thinking": False, "date_string": "26 Jul 2024"}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>",
               "<|endoftext|>", "<end_of_turn>")  # fmt: skip


def render(tokenizer: Any, messages: list[dict[str, str]], *, line: int | None = None,
           **options: Any) -> str:  # fmt: skip
    """The tokenizer's chat template applied to ``messages`` (text), with the pinned
    ``TEMPLATE_VARIABLES``. A template that fails (its syntax, or a role or message it
    refuses) is one DataError naming the template and, when given, the data line."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             **{**TEMPLATE_VARIABLES, **options})  # fmt: skip
    except Exception as exc:  # jinja2's errors, or whatever the template raises itself
        source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"the chat template of {source} failed: {type(exc).__name__}: "
                        f"{first}", line=line) from None  # fmt: skip


def stop_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a turn, where generation stops and a supervised completion ends:
    the ``eos_token_id`` of the model's generation_config.json (one or a list), the
    tokenizer's EOS, and the end-of-turn tokens of the common templates it knows."""
    ids = _generation_eos(getattr(tokenizer, "name_or_path", "") or "")
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return list(dict.fromkeys(ids))


def _generation_eos(directory: str) -> list[int]:
    file = Path(directory) / "generation_config.json"
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
