"""`tabpo data`, `tabpo pairs`, `tabpo eval` and `tabpo build-model` on tiny models built here
(`tabpo demo`: test_demo.py)."""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_model, write_pairs
from typer.testing import CliRunner

from tabpo.backends import get_backend
from tabpo.cli.app import app
from tabpo.clinical import canonical_json, generate_split
from tabpo.clinical.annotate import predict, read_records
from tabpo.clinical.generator import COPY_INSTRUCTION
from tabpo.common.files import write_jsonl
from tabpo.training import config as cfg
from tabpo.training.loop import train


def run(*argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_jsonl(generate_split("test", 4, seed=3), tmp_path_factory.mktemp("d") / "t.jsonl")


def test_data_writes_the_four_splits(tmp_path):
    result = run("data", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    counts = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("*.jsonl")}
    assert counts == {"train.jsonl": 20000, "pref.jsonl": 2000, "dev.jsonl": 300,
                      "test.jsonl": 300}  # fmt: skip
    assert run("data", "--out", tmp_path).exit_code == 2  # no silent overwrite


def test_rule_pairs_are_minimal_edits(tmp_path):
    data = write_jsonl(generate_split("pref", 30, seed=1), tmp_path / "pref.jsonl")
    out = tmp_path / "pairs.jsonl"
    result = run("pairs", "--data", data, "--out", out, "--strategy", "rule")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    for r in rows:  # both sides in the one canonical serialisation
        for side in ("chosen", "rejected"):
            assert canonical_json(json.loads(r[side])["results"]) == r[side]
    result = run("pairs", "--data", data, "--out", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "needs --model" in result.output


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_eval_with_an_adapter_matches_the_trained_model(backend, model_dir, records, tmp_path):
    """A LoRA adapter written by `tabpo train` and loaded by `tabpo eval --adapter` answers
    exactly as the model that trained it (greedy), and differs from the base model."""
    c = cfg.build({}, {"model": str(model_dir), "data": str(write_pairs(tmp_path / "p.jsonl", 4)),
                       "output": str(tmp_path / "out"), "backend": backend, "loss": "sft",
                       "max_steps": 3, "learning_rate": 0.05, "batch_size": 4,
                       "gradient_accumulation_steps": 1, "lora_rank": 4, "lora_dropout": 0.0,
                       "warmup_ratio": 0.0})  # fmt: skip
    run_ = train(c, get_backend(backend))
    from tabpo.data.encoding import load_tokenizer

    rows = read_records(records)
    want = predict(run_.backend, load_tokenizer(model_dir), rows, max_new_tokens=10)
    report = tmp_path / "eval.json"
    result = run("eval", "--model", model_dir, "--adapter", tmp_path / "out", "--data", records,
                 "--backend", backend, "--max-new-tokens", 10, "--out", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert any(line.startswith("decoding: 4/4 (100%)") for line in result.stderr.splitlines())
    got = [json.loads(x)["prediction"] for x in
           report.with_suffix(".predictions.jsonl").read_text().splitlines()]  # fmt: skip
    assert got == want
    doc = json.loads(report.read_text())
    assert {"code/f1", "subcode/f1", "span/f1", "triplet/f1", "json_valid"} <= set(doc["metrics"])
    base = tmp_path / "base.json"
    run("eval", "--model", model_dir, "--data", records, "--backend", backend,
        "--max-new-tokens", 10, "--out", base)  # fmt: skip
    base_preds = [json.loads(x)["prediction"] for x in
                  base.with_suffix(".predictions.jsonl").read_text().splitlines()]  # fmt: skip
    assert base_preds != want
    again = run("eval", "--model", model_dir, "--data", records, "--backend", backend,
                "--max-new-tokens", 10, "--out", base)  # fmt: skip
    assert again.exit_code == 2 and "use --force" in again.output  # no silent overwrite


def test_eval_help_names_the_predictions_file():
    assert ".predictions.jsonl" in " ".join(run("eval", "--help").output.split())


def test_build_model_reproduces_and_installs(tmp_path, monkeypatch):
    """`tabpo build-model` (2 + 2 + 2 steps here): data, tokenizer, random init, the copying
    warm-up (its own stage, whose weights SFT starts from), SFT, SFT on fresh messages (from
    SFT's weights); --install copies the last stage's model directory over the shipped one
    (redirected to tmp here); a second build writes the same bytes."""
    import tabpo.models.tiny as tiny

    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "shipped")
    short = ("--steps", 2, "--copy-steps", 2, "--fresh-steps", 2)
    result = run("build-model", "--out", tmp_path / "build", *short, "--install")
    assert result.exit_code == 0, result.output
    for stage in ("copy", "sft", "fresh"):
        metrics = (tmp_path / "build" / stage / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x).get("step") for x in metrics]
        assert steps[:2] == [1, 2], stage
    config = (tmp_path / "build" / "sft" / "config.yaml").read_text()
    assert f"model: {tmp_path / 'build' / 'copy'}" in config
    assert f"eval_data: {tmp_path / 'build' / 'data' / 'dev.jsonl'}" in config
    data = tmp_path / "build" / "data"
    assert f"data: {data / 'sft-replay.jsonl'}" in config
    mixed = (data / "sft-replay.jsonl").read_text().splitlines()
    sft, warmup = (
        (data / "train.jsonl").read_text().splitlines(),
        set((data / "copy.jsonl").read_text().splitlines()),
    )
    replayed = mixed[len(sft) :]  # the SFT split, then fresh copying records, none the warm-up's
    assert mixed[: len(sft)] == sft and len(replayed) == tiny.REPLAY_SIZE
    assert all(json.loads(r)["prompt"].startswith(COPY_INSTRUCTION) for r in replayed)
    assert not warmup & set(replayed)
    config = (tmp_path / "build" / "fresh" / "config.yaml").read_text()
    assert f"model: {tmp_path / 'build' / 'sft'}" in config
    assert f"data: {data / 'fresh-replay.jsonl'}" in config
    last = (data / "fresh-replay.jsonl").read_text().splitlines()
    fresh, rehearsal = last[: tiny.FRESH_SIZE], last[tiny.FRESH_SIZE :]
    assert len(rehearsal) == 2 * tiny.REPLAY_SIZE
    assert all(json.loads(r)["prompt"].startswith(COPY_INSTRUCTION) for r in rehearsal)
    assert not (warmup | set(replayed)) & set(rehearsal)
    assert not any(json.loads(r)["prompt"].startswith(COPY_INSTRUCTION) for r in fresh)
    # fresh = the SFT split's stream continued past the SFT split, so its first messages are new
    assert fresh[:100] != sft[:100]
    assert (tmp_path / "shipped" / "model.safetensors").read_bytes() == (
        tmp_path / "build" / "fresh" / "model.safetensors"
    ).read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.1e6, rel=0.05)
    again = run("build-model", "--out", tmp_path / "build", *short)
    assert again.exit_code == 2 and "exists" in again.output
    twin = run("build-model", "--out", tmp_path / "twin", *short)  # seeded: the same bytes
    assert twin.exit_code == 0, twin.output
    for stage in ("sft", "fresh"):
        for name in ("model.safetensors", "tokenizer.json"):
            assert (tmp_path / "twin" / stage / name).read_bytes() == (
                tmp_path / "build" / stage / name
            ).read_bytes(), (stage, name)
