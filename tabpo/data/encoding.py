"""Preference pairs tokenized as the trainer sees them, and right-padded batches of them.

With a chat template (docs/design.md, "Two stacks, one model"):

    prompt_text     = template(prompt, add_generation_prompt=True)
    full_text       = template(prompt + [assistant: answer])
    completion_text = full_text[len(prompt_text):]     # the answer and the end-of-turn token
    completion_ids  = tok(full_text)[len(tok(prompt_text)):]

so the end-of-turn token is supervised and the model learns to stop. Without a template the
prompt is the message contents joined by blank lines (with the tokenizer's own special tokens,
e.g. BOS) and the completion is the answer followed by EOS.

Batching into right-padded arrays lives in tabpo.data.batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tabpo.common.errors import DataError, TabpoError, read_json, reading
from tabpo.data.records import PreferenceExample
from tabpo.data.templates import render, stop_ids
from tabpo.losses.weights import (
    ALIGNMENTS,
    DEFAULT_FIELD_WEIGHTS,
    DIFF_FACTOR,
    field_value_weights,
    pair_token_weights,
)
from tabpo.models.families import is_hub_id

Offsets = list[tuple[int, int]]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip


@dataclass
class EncodedPair:
    """Token ids of one pair; `chosen_ids`/`rejected_ids` are the completions only
    (`rejected_ids` None for a prompt/completion example)."""

    index: int
    line: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    chosen_weights: np.ndarray
    rejected_weights: np.ndarray | None


@dataclass
class EncodeStats:
    """Counts over the examples; the last three count encoded pairs only."""

    encoded: int = 0
    skipped_too_long: int = 0
    skipped_identical: int = 0
    prompt_truncated: int = 0
    prefix_mismatches: int = 0
    template_fallbacks: int = 0


@dataclass
class _Completion:
    ids: list[int]
    offsets: Offsets  # relative to the answer content; (0, 0) outside it
    prefix_mismatch: bool = False
    template_fallback: bool = False


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer saved in a local directory."""
    name, path = str(path), Path(path)
    if not path.exists() and not is_hub_id(name):
        raise TabpoError(f"tokenizer path not found: {path}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TabpoError(
            "reading a tokenizer needs transformers: pip install 'tabpo[torch]' or 'tabpo[mlx]'"
        ) from None
    for file in TOKENIZER_FILES:  # a broken file named here, not deep inside the loader
        if (path / file).is_file():
            read_json(path / file)
    with reading(path, "a tokenizer from it"):
        return AutoTokenizer.from_pretrained(name)


def pad_id(tokenizer: Any) -> int:
    """The pad token id, else the EOS id, else 0 (padding is masked out either way)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_pairs(
    tokenizer: Any,
    examples: Sequence[PreferenceExample],
    *,
    max_length: int = 1024,
    field_weights: Mapping[str, float] = DEFAULT_FIELD_WEIGHTS,
    diff_factor: float = DIFF_FACTOR,
    align: str = "edit",
) -> tuple[list[EncodedPair], EncodeStats]:
    """Tokenize every example, with token weights, under the length policy.

    A completion is never truncated: the prompt is cut from the left so that
    len(prompt) + max(len(chosen), len(rejected)) <= max_length, and an example whose longer
    completion has max_length tokens or more is skipped (one prompt token must remain to
    predict the first completion token). Pairs with identical completion ids are skipped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if align not in ALIGNMENTS:
        raise ValueError(f"unknown align {align!r}; expected one of {ALIGNMENTS}")
    if not examples:
        raise DataError("no examples to encode")
    pairs, stats = [], EncodeStats()
    for index, example in enumerate(examples):
        prompt_ids, chosen, rejected = _encode_example(tokenizer, example)
        if rejected is not None and chosen.ids == rejected.ids:
            stats.skipped_identical += 1
            continue
        sides = [chosen] if rejected is None else [chosen, rejected]
        keep = max_length - max(len(side.ids) for side in sides)
        if keep < 1:
            stats.skipped_too_long += 1
            continue
        if len(prompt_ids) > keep:
            prompt_ids = prompt_ids[-keep:]
            stats.prompt_truncated += 1
        stats.prefix_mismatches += any(side.prefix_mismatch for side in sides)
        stats.template_fallbacks += any(side.template_fallback for side in sides)
        if rejected is None or example.rejected is None:
            w_chosen = field_value_weights(example.chosen, chosen.offsets, field_weights)
            pair = EncodedPair(index, example.line, prompt_ids, chosen.ids, None, w_chosen, None)
        else:
            w_chosen, w_rejected = pair_token_weights(
                example.chosen, chosen.offsets, chosen.ids,
                example.rejected, rejected.offsets, rejected.ids,
                field_weights=field_weights, diff_factor=diff_factor, align=align,
            )  # fmt: skip
            pair = EncodedPair(
                index, example.line, prompt_ids, chosen.ids, rejected.ids, w_chosen, w_rejected
            )
        pairs.append(pair)
        stats.encoded += 1
    if not pairs:
        raise DataError(
            f"all {len(examples)} examples were skipped: {stats.skipped_too_long} have a "
            f"completion of max_length={max_length} tokens or more, "
            f"{stats.skipped_identical} tokenize to identical chosen and rejected"
        )
    return pairs, stats


def _encode_example(
    tokenizer: Any, example: PreferenceExample
) -> tuple[list[int], _Completion, _Completion | None]:
    answers = [a for a in (example.chosen, example.rejected) if a is not None]
    if getattr(tokenizer, "chat_template", None):
        prompt_text = render(tokenizer, example.prompt, line=example.line,
                             add_generation_prompt=True)  # fmt: skip
        prompt_ids, _ = _tokenize(tokenizer, prompt_text, add_special_tokens=False)
        done = [_templated(tokenizer, example, prompt_text, prompt_ids, a) for a in answers]
    else:
        prompt_text = "\n\n".join(m["content"] for m in example.prompt)
        prompt_ids, _ = _tokenize(tokenizer, prompt_text, add_special_tokens=True)
        done = [_plain(tokenizer, a) for a in answers]
    if not prompt_ids:
        raise DataError("the prompt encodes to no tokens", line=example.line, field="prompt")
    stops = set(stop_ids(tokenizer))
    done = [_end_of_turn(c, stops) for c in done]
    return prompt_ids, done[0], done[1] if len(done) > 1 else None


def _end_of_turn(completion: _Completion, stops: set[int]) -> _Completion:
    """The completion up to its last end-of-turn token: what the template writes after it
    (a newline) is never generated, since generation stops there, so it is not trained on."""
    ends = [i for i, token in enumerate(completion.ids) if token in stops]
    if not ends or ends[-1] == len(completion.ids) - 1:
        return completion
    keep = ends[-1] + 1
    return dataclasses.replace(completion, ids=completion.ids[:keep],
                               offsets=completion.offsets[:keep])  # fmt: skip


def _templated(
    tokenizer: Any,
    example: PreferenceExample,
    prompt_text: str,
    prompt_ids: list[int],
    answer: str,
) -> _Completion:
    """Completion ids and answer-relative offsets of one answer under the chat template."""
    answered = [*example.prompt, {"role": "assistant", "content": answer}]
    full_text = render(tokenizer, answered, line=example.line)
    if not full_text.startswith(prompt_text):
        # The template renders the prompt differently once answered: answer + EOS instead.
        return _alone(tokenizer, answer + (tokenizer.eos_token or ""), answer, fallback=True)
    text, n, shift = full_text[len(prompt_text) :], len(prompt_ids), len(prompt_text)
    full_ids, full_offsets = _tokenize(tokenizer, full_text, add_special_tokens=False)
    if full_ids[:n] != prompt_ids:
        # A token merged across the prompt/completion boundary: keep the prompt as rendered.
        return _alone(tokenizer, text, answer, mismatch=True)
    ids, offsets = full_ids[n:], full_offsets
    if offsets is not None:
        offsets = [(s - shift, e - shift) for s, e in offsets[n:]]
    return _Completion(ids, _answer_offsets(tokenizer, ids, offsets, text, answer))


def _alone(
    tokenizer: Any, text: str, answer: str, *, fallback: bool = False, mismatch: bool = False
) -> _Completion:
    """Completion text tokenized on its own, without the prompt."""
    ids, offsets = _tokenize(tokenizer, text, add_special_tokens=False)
    relative = _answer_offsets(tokenizer, ids, offsets, text, answer)
    return _Completion(ids, relative, prefix_mismatch=mismatch, template_fallback=fallback)


def _plain(tokenizer: Any, answer: str) -> _Completion:
    """Answer tokens followed by EOS, for tokenizers without a chat template."""
    if tokenizer.eos_token_id is None:
        raise TabpoError("the tokenizer has neither a chat template nor an EOS token")
    completion = _alone(tokenizer, answer, answer)
    completion.ids.append(int(tokenizer.eos_token_id))
    completion.offsets.append((0, 0))
    return completion


def _tokenize(
    tokenizer: Any, text: str, *, add_special_tokens: bool
) -> tuple[list[int], Offsets | None]:
    """Ids and character offsets into `text`; offsets are None for tokenizers without them."""
    if getattr(tokenizer, "is_fast", True):
        try:
            enc = tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
            return list(enc["input_ids"]), offsets
        except NotImplementedError:
            pass
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), None


def _answer_offsets(
    tokenizer: Any, ids: list[int], offsets: Offsets | None, text: str, answer: str
) -> Offsets:
    """Offsets into `text` made relative to the answer inside it, clipped to the answer.

    Tokens outside the answer (template tokens, EOS) get empty ranges, hence weight 1.
    """
    if offsets is None:
        text, offsets = decoded_offsets(tokenizer, ids)
    core = answer.strip()
    lead = len(answer) - len(answer.lstrip())
    start = text.find(answer)
    if start >= 0:
        base, lo, hi = start, 0, len(answer)
    elif core and (start := text.find(core)) >= 0:
        base, lo, hi = start - lead, lead, lead + len(core)  # the template stripped it
    else:
        return [(0, 0)] * len(offsets)
    return [(min(max(s - base, lo), hi), min(max(e - base, lo), hi)) for s, e in offsets]


def decoded_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, Offsets]:
    """Decoded text and token character ranges, for tokenizers that give no offsets.

        range_t = [len(decode(ids[:t])), len(decode(ids[:t+1])))

    A token ending inside a multi-byte character decodes to U+FFFD, which is not counted:
    the token that completes the character covers it.
    """
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    ends = [0]
    for t in range(1, len(ids) + 1):
        prefix = tokenizer.decode(list(ids[:t]), **kwargs)
        ends.append(max(ends[-1], len(prefix.rstrip("\ufffd"))))
    return tokenizer.decode(list(ids), **kwargs), list(zip(ends[:-1], ends[1:], strict=True))
