"""The real SmolLM2-135M-Instruct, offline: what a tiny random model cannot show.

A vocabulary of 49,152 and real, peaky logits expose what 400-word random models hide, such
as MLX's float32 reductions on the CPU, which accumulate sequentially and so err in
proportion to the vocabulary (the normalisation was biased by 2.4e-4 nats per token here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_pairs

from tabpo.backends import get_backend
from tabpo.data.batching import collate
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
from tabpo.data.records import read_preferences
from tabpo.models.families import inspect_model_dir
from tabpo.training.backend import ModelOptions

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.real_model


def log_softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def pair(smollm2, tmp_path_factory):
    """One annotation pair of the chat-templated kind the benchmark uses."""
    tokenizer = load_tokenizer(smollm2)
    data = write_pairs(tmp_path_factory.mktemp("d") / "pairs.jsonl", 1)
    pairs, _ = encode_pairs(tokenizer, read_preferences(data)[0])
    return collate(pairs, pad_id(tokenizer))


def completion(batch, token_logps: np.ndarray) -> np.ndarray:
    """Per-token log-probs (L,) of the sequence's tokens 1.. as the chosen completion's."""
    full = np.zeros(batch.chosen_ids.shape[1])
    full[1 : len(token_logps) + 1] = token_logps
    return full[batch.chosen_mask[0] > 0]


def forward_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log pi(ids[t] | ids[:t]) for t >= 1 from (L, V) logits, normalised in float64."""
    return log_softmax64(logits)[np.arange(len(ids) - 1), ids[1:]]


def test_the_fixture_is_the_real_model(smollm2):
    info = inspect_model_dir(smollm2)
    config = info.config
    assert (info.family, info.num_layers, config["vocab_size"], config["hidden_size"]) == (
        "llama", 30, 49152, 576)  # fmt: skip
    assert info.tie_word_embeddings and info.rope_theta == 100000.0
    backend = get_backend("torch")
    backend.load(ModelOptions(str(smollm2), finetune="full", keep_reference=False))
    tokenizer = load_tokenizer(smollm2)
    from tabpo.training.generation import generate

    answer = generate(backend, tokenizer, [[{"role": "user",
                                             "content": "What is the capital of France?"}]],
                      max_new_tokens=16)  # fmt: skip
    assert answer == ["The capital of France is Paris."]


def test_completion_logps_against_a_float64_oracle(smollm2, pair):
    """Each backend's float32 completion log-probs are within 2x of its own library's plain
    forward normalised in float64, both measured against a float64 forward of the model."""
    from transformers import AutoModelForCausalLM

    n = int(pair.chosen_attention_mask[0].sum())
    ids = pair.chosen_ids[0][:n]
    model64 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float64).eval()
    with torch.no_grad():
        oracle = completion(pair, forward_logps(model64(torch.tensor(ids)[None]).logits[0], ids))
        plain = {"torch": AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)}
        plain_torch = plain["torch"](torch.tensor(ids)[None]).logits[0].numpy()
    from mlx_lm.utils import load

    mlx_model, _ = load(str(smollm2), model_config=inspect_model_dir(smollm2).mlx_overrides())
    mlx_model.set_dtype(mx.float32)
    plain_mlx = np.array(mlx_model(mx.array(ids[None].astype(np.int32)))[0])
    library = {"torch": completion(pair, forward_logps(plain_torch, ids)),
               "mlx": completion(pair, forward_logps(plain_mlx, ids))}  # fmt: skip
    assert len(oracle) >= 20, "a completion of some length"
    for name in ("torch", "mlx"):
        backend = get_backend(name)
        backend.load(ModelOptions(str(smollm2), finetune="full", keep_reference=False))
        ours = backend.logps(pair)[0][0][pair.chosen_mask[0] > 0]
        err, floor = np.abs(ours - oracle).max(), np.abs(library[name] - oracle).max()
        bias = abs(float((ours - oracle).sum()))
        assert err <= 2 * floor, (
            f"{name}: max per-token error {err:.2e} against float64, its library's own "
            f"float32 forward {floor:.2e}; sequence sum off by {bias:.2e}"
        )


@pytest.mark.parametrize("vocab", [49152, 151936])
def test_mlx_vocabulary_normalisation_does_not_drift_with_its_size(vocab):
    """On random logits (std 3) the two-stage logsumexp stays within 1e-5 of float64 where
    a single sequential one drifts low by 6e-5 (49k) to 3e-4 (152k)."""
    from tabpo.backends._mlx_logps import vocab_logsumexp, vocab_sum

    z = np.random.default_rng(0).normal(0.0, 3.0, (8, vocab)).astype(np.float32)
    want = np.log(np.exp(z.astype(np.float64)).sum(-1))
    got = np.array(vocab_logsumexp(mx.array(z)))[:, 0]
    assert np.abs(got - want).max() < 1e-5, (
        f"two-stage logsumexp off by {np.abs(got - want).max():.2e}"
    )
    p = np.exp(z - z.max(-1, keepdims=True)).astype(np.float32)
    want_sum = p.astype(np.float64).sum(-1)
    got_sum = np.array(vocab_sum(mx.array(p)))
    assert np.abs(got_sum / want_sum - 1).max() < 1e-5


def test_conversion_round_trip_is_bit_exact_and_verified(smollm2, tmp_path):
    """transformers -> mlx-lm -> transformers on the real model: the bf16 tensors come back
    bit for bit, and each conversion's own verification (both stacks score seeded
    sequences) passes; the mlx-lm side gets the top-level rope_theta of 100000 that
    transformers 5 nests and mlx-lm 0.32 would otherwise replace with its default."""
    from tabpo.models.convert import convert
    from tabpo.models.tensors import read_header, read_tensors

    there = convert(smollm2, tmp_path / "mlx", to="mlx")
    back = convert(tmp_path / "mlx", tmp_path / "back", to="torch")
    for outcome in (there, back):
        assert outcome.verification is not None, outcome.unverified
        assert outcome.verification.max_diff <= outcome.verification.tolerance
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["rope_theta"] == 1e5
    original = read_tensors(read_header(smollm2 / "model.safetensors"))  # raw bf16 bytes
    returned = read_tensors(read_header(tmp_path / "back" / "model.safetensors"))
    assert sorted(original) == sorted(returned)
    assert all(original[k] == returned[k] for k in original)  # dtype, shape and every byte


def test_a_short_lora_run_lowers_the_loss(smollm2, tmp_path):
    """Four TAB-PO steps of LoRA on four short annotation pairs: the loss on the same pairs
    (evaluated before and after, no dropout) goes down on the real model. torch only: MLX's
    Linux CPU build is too slow for a 135M model in the suite (the parity of the two
    backends' steps is tested on the tiny models)."""
    from tabpo.training import config as cfg
    from tabpo.training.loop import train

    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    c = cfg.build({}, {"model": str(smollm2), "data": str(data), "eval_data": str(data),
                       "output": str(tmp_path / "out"), "backend": "torch", "max_steps": 4,
                       "batch_size": 4, "gradient_accumulation_steps": 1, "lora_rank": 8,
                       "lora_dropout": 0.0, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                       "eval_steps": 2, "ref_cache_dir": str(tmp_path / "cache")})  # fmt: skip
    train(c, get_backend("torch"))
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x)["eval_loss"] for x in lines if "eval_loss" in x]
    assert evals[-1] < evals[0], evals


def test_parity_passes_on_the_real_model(smollm2, tmp_path):
    """`tabpo parity` on SmolLM2 (one benchmark pair, TAB-PO and DPO): every row within
    rounding, in a process of its own so that, on Linux, MLX runs on the system OpenBLAS
    (its bundled CPU BLAS is ~70x slower: the suite's time)."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.bench import OPENBLAS

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if platform.system() == "Linux":
        assert Path(OPENBLAS).exists(), (
            f"{OPENBLAS} is missing: install Debian's libopenblas0-pthread (.ci/run does)"
        )
        env["LD_PRELOAD"] = OPENBLAS
    argv = [sys.executable, "-m", "tabpo", "parity", "--model", str(smollm2), "--pairs", "1",
            "--loss", "tabpo", "--loss", "dpo", "--json"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout)
    checks = {c["quantity"]: c for c in doc["checks"]}
    assert doc["pass"] and set(doc["seconds"]) == {"torch float32", "mlx float32",
                                                   "torch float64", "mlx float64"}  # fmt: skip
    logps = checks["policy log-probs (chosen)"]
    assert logps["torch"] < -10 and 1e-7 < logps["torch_error"] < 1e-3, logps
    assert "sum c l: gradient (420 tensors)" in checks and "tabpo: dL/dlog-probs" in checks
