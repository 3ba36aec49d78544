"""Pair encoding with a tiny ChatML tokenizer built in tests/helpers.py (nothing downloaded).

The tokenizer renders a message as ``<|im_start|>role\\ncontent<|im_end|>\\n`` and the
generation prompt as ``<|im_start|>assistant\\n``, so for an answer A the completion is
``A<|im_end|>``: the answer tokens and the end-of-turn token, where generation stops (the
newline the template writes after it is not trained on).
GOLD tokenizes to ... ``' "'`` ``build`` ``' trust'`` ``'",'`` ... ``' "'`` ``I`` ``' trust'``
``' your'`` ``' judgement'`` ``'"}]}'`` (checked in test_gold_pieces), "connection" to
``connect`` ``ion``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import ANNOTATION as GOLD
from helpers import CHATML_TEMPLATE, build_chatml_tokenizer

from tabpo.common.errors import DataError, TabpoError
from tabpo.data.batching import batches, collate
from tabpo.data.encoding import (
    EncodeStats,
    decoded_offsets,
    encode_pairs,
    load_tokenizer,
    pad_id,
)
from tabpo.data.records import PreferenceExample

pytest.importorskip("transformers")

SYSTEM = "You are a helpful assistant."
USER = "Annotate: I trust your judgement"
SWAPPED = GOLD.replace("build trust", "connection")
CUT = GOLD.replace("your judgement", "your")
PROMPT_TEXT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def example(chosen=GOLD, rejected=SWAPPED, user=USER, line=1):
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return PreferenceExample(prompt, chosen, rejected, line, conversational=False)


def ids_of(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


def test_gold_pieces(chatml_tokenizer):
    tok = chatml_tokenizer
    got = pieces(tok, ids_of(tok, GOLD))
    assert got[14:18] == [' "', "build", " trust", '",']
    assert got[-5:] == ["I", " trust", " your", " judgement", '"}]}']
    assert pieces(tok, ids_of(tok, "connection")) == ["connect", "ion"]


def test_completion_is_answer_and_end_of_turn(chatml_tokenizer):
    """prompt ids = tok(PROMPT_TEXT); completion = tok(GOLD + "<|im_end|>"): the answer and the
    end-of-turn token, where generation stops (the newline the template writes after it is
    not trained on); prompt + completion = tok(PROMPT_TEXT + GOLD + "<|im_end|>") (the
    prefix property)."""
    tok = chatml_tokenizer
    (pair,), stats = encode_pairs(tok, [example()])
    assert pair.prompt_ids == ids_of(tok, PROMPT_TEXT)
    assert pair.chosen_ids == ids_of(tok, GOLD + "<|im_end|>")
    assert pair.prompt_ids + pair.chosen_ids == ids_of(tok, PROMPT_TEXT + GOLD + "<|im_end|>")
    assert pair.chosen_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert stats == EncodeStats(encoded=1)
    assert (pair.index, pair.line) == (0, 1)


def test_weights_of_swapped_sub_code(chatml_tokenizer):
    """build trust -> connection (edit alignment): build and ' trust' are Sub-code (1.2) and
    differ (x 1.2) -> 1.44, and so are connect and ion; PartnershipPatient is Code -> 1.1, the
    Span tokens I ' trust' ' your' ' judgement' -> 1.1; keys, quotes and <|im_end|> -> 1.0."""
    tok = chatml_tokenizer
    (pair,), _ = encode_pairs(tok, [example()])
    want = {"build": 1.44, "PartnershipPatient": 1.1, "I": 1.1, " judgement": 1.1, " your": 1.1}
    want |= {'{"': 1.0, "Code": 1.0, "Sub": 1.0, '"}]}': 1.0, "<|im_end|>": 1.0}
    chosen = pieces(tok, pair.chosen_ids)
    for piece, w in want.items():
        assert pair.chosen_weights[chosen.index(piece)] == pytest.approx(w), piece
    assert [pair.chosen_weights[i] for i, p in enumerate(chosen) if p == " trust"] == (
        pytest.approx([1.44, 1.1])
    )
    rejected = pieces(tok, pair.rejected_ids)
    for piece in ("connect", "ion"):
        assert pair.rejected_weights[rejected.index(piece)] == pytest.approx(1.44)
    assert pair.chosen_weights.dtype == np.float64
    assert len(pair.chosen_weights) == len(pair.chosen_ids)


def test_weights_of_unchanged_sub_code(chatml_tokenizer):
    """Span cut short: the Sub-code tokens do not differ -> 1.2; ' judgement' is Span (1.1)
    and differs -> 1.32; in the rejected nothing differs, its ' your' is Span -> 1.1."""
    tok = chatml_tokenizer
    (pair,), _ = encode_pairs(tok, [example(rejected=CUT)])
    chosen = pieces(tok, pair.chosen_ids)
    assert pair.chosen_weights[chosen.index("build")] == pytest.approx(1.2)
    assert pair.chosen_weights[chosen.index(" judgement")] == pytest.approx(1.32)
    rejected = pieces(tok, pair.rejected_ids)
    assert pair.rejected_weights[rejected.index(" your")] == pytest.approx(1.1)
    assert pair.rejected_weights.max() == pytest.approx(1.2)


def test_batch_masks_line_up_with_ids(chatml_tokenizer):
    """Row b, side s: ids = prompt + completion + pads; column t of mask and weights is
    nonzero exactly for P <= t < P + C, where ids[t] is completion token t - P."""
    tok = chatml_tokenizer
    pairs, _ = encode_pairs(tok, [example(), example(user="Hi", rejected=CUT, line=7)])
    batch = collate(pairs, pad_id(tok))
    length = max(len(p.prompt_ids) + len(c) for p in pairs for c in (p.chosen_ids, p.rejected_ids))
    assert batch.chosen_ids.shape == batch.rejected_ids.shape == (2, length)
    assert batch.chosen_ids.dtype == np.int64 and batch.chosen_mask.dtype == np.float32
    np.testing.assert_array_equal(batch.indices, [0, 1])
    for b, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            ids, mask = getattr(batch, f"{side}_ids")[b], getattr(batch, f"{side}_mask")[b]
            attention = getattr(batch, f"{side}_attention_mask")[b]
            weights = getattr(batch, f"{side}_weights")[b]
            completion = getattr(pair, f"{side}_ids")
            start, end = len(pair.prompt_ids), len(pair.prompt_ids) + len(completion)
            assert list(ids[:start]) == pair.prompt_ids
            assert list(ids[start:end]) == completion
            assert (ids[end:] == tok.pad_token_id).all()
            assert list(np.flatnonzero(mask)) == list(range(start, end))
            assert list(np.flatnonzero(attention)) == list(range(end))
            np.testing.assert_allclose(weights[start:end], getattr(pair, f"{side}_weights"))
            assert (weights[:start] == 0).all() and (weights[end:] == 0).all()
            assert mask[0] == 0 and mask[end - 1] == 1  # <|im_end|> is supervised, last
            assert ids[end - 1] == tok.eos_token_id


def test_prompt_is_truncated_from_the_left(chatml_tokenizer):
    """Both completions are 28 tokens here; max_length 28 + 3 leaves the last 3 prompt tokens
    (``<|im_start|>`` ``assistant`` ``\\n``)."""
    tok = chatml_tokenizer
    c = len(ids_of(tok, GOLD + "<|im_end|>"))
    assert c == len(ids_of(tok, SWAPPED + "<|im_end|>")) == 28
    (pair,), stats = encode_pairs(tok, [example()], max_length=c + 3)
    assert pair.prompt_ids == ids_of(tok, PROMPT_TEXT)[-3:]
    assert pieces(tok, pair.prompt_ids) == ["<|im_start|>", "assistant", "\n"]
    assert stats.prompt_truncated == 1
    _, stats = encode_pairs(tok, [example()], max_length=1024)
    assert stats.prompt_truncated == 0


def test_too_long_completions_are_skipped(chatml_tokenizer):
    """The longer completion of example 0 is 28 tokens: max_length 28 leaves no prompt token,
    so it is skipped; example 1 (``{}`` answers, 2-3 tokens + 1) stays. max_length 29 keeps
    both, with a one-token prompt for example 0."""
    tok = chatml_tokenizer
    examples = [example(), example(chosen="{}", rejected='{"a"}', line=2)]
    pairs, stats = encode_pairs(tok, examples, max_length=28)
    assert [p.index for p in pairs] == [1]
    assert (stats.encoded, stats.skipped_too_long) == (1, 1)
    pairs, stats = encode_pairs(tok, examples, max_length=29)
    assert len(pairs[0].prompt_ids) == 1 and stats.skipped_too_long == 0
    with pytest.raises(DataError, match="max_length=28"):
        encode_pairs(tok, examples[:1], max_length=28)


def test_identical_token_ids_are_skipped():
    """A template that trims contents renders "A" and "A  " identically."""
    tok = build_chatml_tokenizer()
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")
    pairs, stats = encode_pairs(tok, [example("A", "A  "), example()])
    assert [p.index for p in pairs] == [1]
    assert (stats.skipped_identical, stats.encoded) == (1, 1)


def test_without_chat_template():
    """Prompt = contents joined by a blank line, with the tokenizer's BOS; completion =
    answer tokens + EOS, and the weights still find the Sub-code value (1.44)."""
    from tokenizers.processors import TemplateProcessing

    tok = build_chatml_tokenizer()
    tok.chat_template = None
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    (pair,), _ = encode_pairs(tok, [example()])
    assert pair.prompt_ids == [0, *ids_of(tok, f"{SYSTEM}\n\n{USER}")]
    assert pair.chosen_ids == [*ids_of(tok, GOLD), tok.eos_token_id]
    assert pair.chosen_weights[pieces(tok, pair.chosen_ids).index("build")] == pytest.approx(1.44)
    assert pair.chosen_weights[-1] == 1.0


def test_prefix_mismatch_is_counted():
    """An answer starting with two newlines: the prompt ends with the token "\\n", but in the
    full text that newline merges with the answer's into "\\n\\n", so the prompt is no prefix.
    The completion is then its text tokenized on its own."""
    tok = build_chatml_tokenizer()
    answer = "\n\n" + GOLD
    (pair,), stats = encode_pairs(tok, [example(chosen=answer)])
    assert stats.prefix_mismatches == 1
    assert pair.prompt_ids == ids_of(tok, PROMPT_TEXT)
    assert pair.chosen_ids == ids_of(tok, answer + "<|im_end|>")
    assert pair.chosen_weights[pieces(tok, pair.chosen_ids).index("build")] == pytest.approx(1.44)


def test_template_fallback_is_counted():
    """A generation prompt the answered conversation does not start with (an empty thinking
    block): the completion falls back to the answer + EOS text."""
    tok = build_chatml_tokenizer()
    tok.chat_template = CHATML_TEMPLATE.replace(
        "assistant\n{% endif %}", "assistant\n<think>\n\n</think>\n\n{% endif %}"
    )
    (pair,), stats = encode_pairs(tok, [example()])
    assert stats.template_fallbacks == 1
    assert pair.chosen_ids == ids_of(tok, GOLD + "<|im_end|>")
    assert pair.prompt_ids == ids_of(tok, PROMPT_TEXT + "<think>\n\n</think>\n\n")


class NoOffsets:
    """The same tokenizer seen as a slow one: it gives no offsets."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError
        return self._fast(text, **kwargs)


def test_offsets_by_decoding_match_the_fast_ones(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = tok(GOLD, add_special_tokens=False, return_offsets_mapping=True)
    text, offsets = decoded_offsets(tok, enc["input_ids"])
    assert text == GOLD
    assert offsets == [tuple(o) for o in enc["offset_mapping"]]
    (fast,), _ = encode_pairs(tok, [example()])
    (slow,), _ = encode_pairs(NoOffsets(tok), [example()])
    assert slow.chosen_ids == fast.chosen_ids
    np.testing.assert_allclose(slow.chosen_weights, fast.chosen_weights)
    np.testing.assert_allclose(slow.rejected_weights, fast.rejected_weights)


def test_batches_order_and_drop_last(chatml_tokenizer):
    """5 pairs, batch 2: in order [0,1] [2,3] [4]; shuffled, default_rng(3).permutation(5)
    cut in twos; drop_last removes the single last pair."""
    tok = chatml_tokenizer
    pairs, _ = encode_pairs(tok, [example(line=i) for i in range(5)])
    got = [list(b.indices) for b in batches(pairs, 2, pad_id=0)]
    assert got == [[0, 1], [2, 3], [4]]
    order = list(np.random.default_rng(3).permutation(5))
    got = [list(b.indices) for b in batches(pairs, 2, pad_id=0, shuffle=True, seed=3)]
    assert got == [order[:2], order[2:4], order[4:]]
    assert len(list(batches(pairs, 2, pad_id=0, drop_last=True))) == 2
    with pytest.raises(ValueError):
        next(batches(pairs, 0, pad_id=0))


def test_pad_id(chatml_tokenizer):
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_id(chatml_tokenizer) == 0  # <|endoftext|>
    assert (pad_id(Tok(None, 7)), pad_id(Tok(None, None)), pad_id(Tok(3, 7))) == (7, 0, 3)


def test_load_tokenizer(tmp_path, monkeypatch):
    saved = build_chatml_tokenizer(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert ids_of(loaded, PROMPT_TEXT + GOLD) == ids_of(saved, PROMPT_TEXT + GOLD)
    messages = example().prompt
    assert loaded.apply_chat_template(messages, tokenize=False) == saved.apply_chat_template(
        messages, tokenize=False
    )
    with pytest.raises(TabpoError, match="missing-dir"):
        load_tokenizer(tmp_path / "missing-dir")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TabpoError, match=r"pip install 'tabpo\[torch\]'"):
        load_tokenizer(tmp_path / "tok")


def test_core_modules_import_no_backend():
    code = (
        "import sys, tabpo.losses.weights, tabpo.data.records, tabpo.data.encoding; "
        "print([m for m in ('torch', 'mlx', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
