"""Shared fixtures."""

from __future__ import annotations

import pytest
from helpers import build_chatml_tokenizer, build_tiny_model


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A tiny ChatML tokenizer shared by the session: do not mutate it (build your own with
    ``helpers.build_chatml_tokenizer()`` to change its template or special tokens)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    return build_chatml_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family="llama", *, seed=0, tie=False, layers=2)``: a tiny random model
    directory (``helpers.build_tiny_model``), built once per session and shared by every
    test that asks for the same one: read it, never write into it."""
    pytest.importorskip("transformers")
    built = {}

    def get(family="llama", *, seed=0, tie=False, layers=2):
        key = (family, seed, tie, layers)
        if key not in built:
            where = tmp_path_factory.mktemp(f"{family}-seed{seed}-tie{int(tie)}-layers{layers}")
            built[key] = build_tiny_model(where, family, seed=seed, tie=tie, layers=layers)
        return built[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a 2-core machine OpenMP's spinning
    threads made the torch tests 3-6x slower and their runtime erratic."""
    try:
        import torch
    except ImportError:  # the core's tests run without torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
