"""Shared fixtures."""

from __future__ import annotations

import pytest
from helpers import build_chatml_tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A tiny ChatML tokenizer shared by the session: do not mutate it (build your own with
    ``helpers.build_chatml_tokenizer()`` to change its template or special tokens)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    return build_chatml_tokenizer()
