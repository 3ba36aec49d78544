"""The benchmark's fixture is what benchmarks/RESULTS.md says it is, token for token."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.fixture import FixtureSpec, build
from tabpo.data.encoding import encode_pairs, load_tokenizer
from tabpo.data.layout import common_prefix
from tabpo.data.records import read_preferences


def test_fixture_pairs_are_long_prompts_with_near_identical_completions(tmp_path):
    spec = FixtureSpec(pairs=6, prompt_tokens=128, completion_tokens=24, seed=3)
    info = build(tmp_path, spec)
    assert 4.0e6 < info["parameters"] < 4.5e6  # "a tiny llama-family model, about 4M"
    tokenizer = load_tokenizer(tmp_path / "model")
    examples = read_preferences(tmp_path / "pairs.jsonl")[0]
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    pairs, stats = encode_pairs(tokenizer, examples)
    assert stats.encoded == 6
    for p, row in zip(pairs, rows, strict=True):
        words = tokenizer.convert_ids_to_tokens  # every word is one known token
        assert words(p.prompt_ids[1:]) == row["prompt"].split()
        assert words(p.rejected_ids[:-1]) == row["rejected"].split()
        assert len(p.prompt_ids) == 128 and p.prompt_ids[0] == tokenizer.bos_token_id
        assert len(p.chosen_ids) == len(p.rejected_ids) == 24
        assert p.chosen_ids[-1] == tokenizer.eos_token_id
        differ = np.array(p.chosen_ids) != np.array(p.rejected_ids)
        assert 1 <= differ.sum() <= 3
        both = np.array(p.prompt_ids + p.chosen_ids), np.array(p.prompt_ids + p.rejected_ids)
        forked = 2 * len(both[0]) - common_prefix(*both)
        assert forked <= 0.6 * 2 * len(both[0])  # the shared prefix is most of each pair
