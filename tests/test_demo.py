"""`tabpo demo` end to end on tiny random models built here: the shipped-model path (full
fine-tuning from an SFT model) and the path of a user's model (LoRA SFT, merge, LoRA)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tabpo.backends import get_backend
from tabpo.cli.app import app
from tabpo.clinical import report
from tabpo.clinical.demo import LORA_LEARNING_RATE, DemoSettings, run_demo
from tabpo.clinical.stats import metric
from tabpo.training.loop import Callbacks

PNG = b"\x89PNG\r\n\x1a\n"


def run(*argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


def test_demo_end_to_end(tiny_model, tmp_path):
    """The shipped-model path on a tiny random model: pairs, two methods, a report, a
    figure; results.json holds every message's counts, which give back the reported
    metrics exactly."""
    s = DemoSettings(out=tmp_path, model=tiny_model(), backend="torch", pref_size=12,
                     test_size=4, steps=2, batch_size=2, max_new_tokens=6)  # fmt: skip
    result = run_demo(s, get_backend, Callbacks())
    assert set(result.scores) == {"sft", "dpo", "tabpo"}
    assert [len(result.counts[m]) for m in ("sft", "dpo", "tabpo")] == [1, 1, 1]
    assert [step for step, _ in result.curves["tabpo"]] == [1, 2]
    path = report.write(result, tmp_path, "tabpo demo --test")
    text = path.read_text()
    for name in ("| SFT |", "| DPO |", "| TAB-PO |", "| TAB-PO − DPO |", "TAB-PO vs SFT: ",
                 "tabpo demo --test", "A preview: one training seed", "--full"):  # fmt: skip
        assert name in text
    assert (tmp_path / "figure.png").read_bytes()[:8] == PNG
    pairs = (tmp_path / "data" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == result.pair_stats["pairs"]
    doc = json.loads((tmp_path / "results.json").read_text())
    settings = doc["settings"]
    assert settings["seeds"] == 1 and settings["methods"] == ["dpo", "tabpo"]  # typed JSON
    assert settings["learning_rate"] == 2e-5 and settings["out"] == str(tmp_path)
    assert settings["finetune"] == "full" and settings["test_size"] == 4
    for model, runs in doc["counts"].items():
        for rows, scores in zip(runs, doc["scores"][model], strict=True):
            assert len(rows) == 4
            sums = np.asarray(rows).sum(axis=0)
            for name in ("code/f1", "span/f1", "triplet/f1", "json_valid", "span_verbatim"):
                assert float(metric(sums, doc["columns"], name)) == scores[name]
    stages = set(result.seconds)  # each stage's own time, in the report too
    assert {"SFT on test", "train dpo (seed 0)", "tabpo on test (seed 0)"} <= stages
    assert all(v >= 0 for v in result.seconds.values()) and "Time: " in text


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_demo_on_a_users_model(backend, tiny_model, tmp_path):
    """`tabpo demo --model DIR`: LoRA SFT on the SFT split (3 steps), the adapter merged
    into a full SFT model (W + scale B A, the other tensors as they were), then DPO and
    TAB-PO each a LoRA adapter on that merged model; the report holds all three."""
    from safetensors.numpy import load_file

    from tabpo.models.adapters import read_adapter, read_canonical

    base, out = tiny_model(), tmp_path / "demo"
    result = run("demo", "--model", base, "--out", out, "--backend", backend, "--pref-size", 12,
                 "--test-size", 4, "--steps", 2, "--batch-size", 2, "--max-new-tokens", 6,
                 "--sft-size", 8, "--sft-steps", 3, "--sft-learning-rate", 0.05,
                 "--lora-rank", 4)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "A preview: one training seed." in result.output
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["scores"]) == {"sft", "dpo", "tabpo"}
    s = doc["settings"]
    got = [s[k] for k in ("finetune", "sft_size", "sft_steps", "lora_rank", "learning_rate",
                          "pref_size", "test_size")]  # fmt: skip
    assert got == ["lora", 8, 3, 4, LORA_LEARNING_RATE, 12, 4]
    assert {"train SFT (LoRA)", "merge the SFT adapter", "train dpo (seed 0)"} <= set(
        doc["seconds"]
    )
    sft_log = (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("step") for x in sft_log] == [1, 2, 3]
    # the merged SFT model is the base plus the trained adapter
    adapter = read_canonical(out / "runs" / "sft")
    scale = read_adapter(out / "runs" / "sft").scale
    before, merged = (
        load_file(base / "model.safetensors"),
        load_file(out / "sft-model" / "model.safetensors"),
    )
    q = "model.layers.0.self_attn.q_proj"
    want = before[f"{q}.weight"] + scale * adapter[f"{q}.lora_B"] @ adapter[f"{q}.lora_A"]
    assert not np.allclose(merged[f"{q}.weight"], before[f"{q}.weight"])
    np.testing.assert_allclose(merged[f"{q}.weight"], want, atol=1e-6)
    assert np.array_equal(merged["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    for method in ("dpo", "tabpo"):  # each method: a LoRA adapter on the merged SFT model
        run_dir = out / "runs" / f"{method}-seed0"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"] == str(out / "sft-model") and config["finetune"] == "lora"
        assert config["lora_rank"] == 4 and config["learning_rate"] == LORA_LEARNING_RATE
        assert not (run_dir / "model.safetensors").exists()  # an adapter, not a full model
    text = (out / "report.md").read_text()
    assert "| SFT |" in text and "| TAB-PO − DPO |" in text
    assert (out / "figure.png").read_bytes()[:8] == PNG


def test_demo_refuses_bad_models_and_outputs(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    for force in ([], ["--force"]):  # not a tabpo output directory: never replaced
        result = run("demo", "--out", tmp_path, *force)
        assert result.exit_code == 2 and "not written by tabpo" in result.output
    assert (tmp_path / "keep.txt").exists()
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "none", tmp_path / "empty"):
        result = run("demo", "--out", tmp_path / "new", "--model", missing)
        assert result.exit_code == 2, result.output
        assert "no config.json there" in result.output
        assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    result = run("demo", "--out", tmp_path / "new", "--sft-steps", 5)
    assert result.exit_code == 2 and "--sft-steps: only with --model" in result.output


def test_demo_help_names_the_options_and_their_defaults():
    """Every size and budget option is in --help with the default DemoSettings has."""
    shown = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    text = " ".join(shown.replace("│", " ").split())  # unboxed
    d = DemoSettings(out=None, model=None)  # type: ignore[arg-type]
    for flag, default in (("--steps", d.steps), ("--pref-size", d.pref_size),
                          ("--test-size", d.test_size), ("--sft-steps", d.sft_steps),
                          ("--sft-size", d.sft_size), ("--lora-rank", d.lora_rank),
                          ("--sft-learning-rate", d.sft_learning_rate),
                          ("--learning-rate", d.learning_rate)):  # fmt: skip
        shown = re.search(rf"{flag} <\w+> [^(]*\([^)]*?default ([\de.-]+)", text)
        assert shown and float(shown.group(1)) == default, flag
    for flag in ("--batch-size", "--max-new-tokens", "--dtype", "--gradient-checkpointing"):
        assert flag in text
    with_model = re.search(r"([\de.-]+) with --model\)", text)
    assert with_model and float(with_model.group(1)) == LORA_LEARNING_RATE
