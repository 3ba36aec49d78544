"""Chat templates as training and generation both use them: Qwen3's empty think block, a
date written into the prompt, and stop tokens from generation_config.json."""

from __future__ import annotations

import json

import pytest
from helpers import ANNOTATION, build_chatml_tokenizer

from tabpo.data.encoding import encode_pairs, load_tokenizer
from tabpo.data.records import PreferenceExample
from tabpo.data.templates import render, stop_ids
from tabpo.training.generation import prompt_ids

pytest.importorskip("transformers")

# Qwen3's shape: the last assistant turn gets an empty think block before its answer, and
# the generation prompt gets it only with enable_thinking=False
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
PROMPT = [{"role": "user", "content": "Annotate: I trust your judgement"}]


def test_qwen3s_empty_think_block_is_prompt_not_completion():
    """Trained on what inference sees: the think block is in the prompt (the generation
    prompt tabpo decodes from has it too), the completion is the answer and <|im_end|>."""
    tok = build_chatml_tokenizer()
    tok.chat_template = QWEN3_LIKE
    (pair,), stats = encode_pairs(tok, [PreferenceExample(PROMPT, ANNOTATION, "{}", 1, False)])
    assert tok.decode(pair.chosen_ids) == ANNOTATION + "<|im_end|>"
    assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_ids(tok, PROMPT) == pair.prompt_ids  # what generation starts from
    assert stats.template_fallbacks == 0  # (this tiny BPE merges the block's "\n\n" with "{")


def test_a_date_in_the_template_is_pinned():
    """Llama 3 writes today's date; pinned, the same data gives the same ids every day."""
    tok = build_chatml_tokenizer()
    tok.chat_template = ('Today Date: {{ date_string if date_string is defined else '
                         'strftime_now("%d %b %Y") }}\n' + tok.chat_template)  # fmt: skip
    assert render(tok, PROMPT, add_generation_prompt=True).startswith("Today Date: 26 Jul 2024\n")


def test_stop_tokens_come_from_generation_config(tmp_path):
    tok = build_chatml_tokenizer(tmp_path)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start not in stop_ids(load_tokenizer(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [start, 2]}))
    stops = stop_ids(load_tokenizer(tmp_path))
    assert start in stops and tok.convert_tokens_to_ids("<|im_end|>") in stops
