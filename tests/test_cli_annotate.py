"""`tabpo data`, `tabpo pairs`, `tabpo eval` and `tabpo demo` on tiny models built here."""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_model, write_pairs
from typer.testing import CliRunner

from tabpo.backends import get_backend
from tabpo.cli.app import app
from tabpo.clinical import canonical_json, generate_split
from tabpo.clinical.annotate import predict, read_records
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
    assert counts == {"train.jsonl": 8000, "pref.jsonl": 2000, "dev.jsonl": 300,
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


def test_demo_end_to_end(model_dir, tmp_path):
    """The demo pipeline on a tiny random model: pairs, two methods, a report and a figure."""
    from tabpo.clinical import report
    from tabpo.clinical.demo import DemoSettings, run_demo
    from tabpo.training.loop import Callbacks

    s = DemoSettings(out=tmp_path, model=model_dir, backend="torch", pref_size=12, test_size=4,
                     steps=2, batch_size=2, max_new_tokens=6)  # fmt: skip
    result = run_demo(s, get_backend, Callbacks())
    assert set(result.scores) == {"sft", "dpo", "tabpo"}
    assert [step for step, _ in result.curves["tabpo"]] == [1, 2]
    path = report.write(result, tmp_path, "tabpo demo --test")
    text = path.read_text()
    for name in ("| SFT |", "| DPO |", "| TAB-PO |", "tabpo demo --test"):
        assert name in text
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = (tmp_path / "data" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == result.pair_stats["pairs"]
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["seeds"] == 1 and settings["methods"] == ["dpo", "tabpo"]  # typed JSON
    assert settings["learning_rate"] == 2e-5 and settings["out"] == str(tmp_path)
    stages = set(result.seconds)  # each stage's own time, in the report too
    assert {"SFT on test", "train dpo (seed 0)", "tabpo on test (seed 0)"} <= stages
    assert all(v >= 0 for v in result.seconds.values()) and "Time: " in text


def test_build_model_reproduces_and_installs(tmp_path, monkeypatch):
    """`tabpo build-model` (2 SFT steps here): data, tokenizer, random init, SFT; --install
    copies a loadable model directory over the shipped one (redirected to tmp here); a second
    build writes the same bytes."""
    import tabpo.models.tiny as tiny

    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "shipped")
    result = run("build-model", "--out", tmp_path / "build", "--steps", 2, "--install")
    assert result.exit_code == 0, result.output
    steps = [json.loads(x).get("step") for x in
             (tmp_path / "build" / "sft" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps[:2] == [1, 2]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.1e6, rel=0.05)
    again = run("build-model", "--out", tmp_path / "build", "--steps", 2)
    assert again.exit_code == 2 and "exists" in again.output
    twin = run("build-model", "--out", tmp_path / "twin", "--steps", 2)  # seeded: same bytes
    assert twin.exit_code == 0, twin.output
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "twin" / "sft" / name).read_bytes() == (
            tmp_path / "build" / "sft" / name
        ).read_bytes(), name


def test_demo_refuses_existing_output_and_missing_model(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    for force in ([], ["--force"]):  # not a tabpo output directory: never replaced
        result = run("demo", "--out", tmp_path, *force)
        assert result.exit_code == 2 and "not written by tabpo" in result.output
    assert (tmp_path / "keep.txt").exists()
    result = run("demo", "--out", tmp_path / "new", "--model", tmp_path / "none")
    assert result.exit_code == 2 and "no SFT model" in result.output
