"""`tabpo parity`: both backends on one model, a table or JSON, exit 1 on any failure."""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_model, write_pairs
from typer.testing import CliRunner

from tabpo.cli.app import app
from tabpo.training import parity as parity_mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return build_tiny_model(root / "m", "llama"), write_pairs(root / "d.jsonl", 3)


def run(*argv):
    return CliRunner().invoke(app, ["parity", *map(str, argv)])


def test_json_document(setup):
    model, data = setup
    result = run("--model", model, "--data", data, "--loss", "tabpo", "--loss", "ipo", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pass"] is True and doc["dtype"] == "float32"
    for backend in ("torch", "mlx"):
        assert set(doc["backends"][backend]) == {"tabpo", "ipo"}
        assert "loss/barrier" in doc["backends"][backend]["tabpo"]["metrics"]
    quantities = [c["quantity"] for c in doc["checks"]]
    assert "policy log-probs (chosen)" in quantities
    assert "tabpo: gradients (28 tensors)" in quantities
    t, m = (doc["backends"][b]["tabpo"]["loss"] for b in ("torch", "mlx"))
    assert abs(t - m) <= 1e-5 * max(abs(t), 1.0)


def test_a_failed_check_exits_1(setup, monkeypatch):
    model, data = setup
    monkeypatch.setitem(parity_mod.TOLERANCES, "float32",
                        {"logps": 0.0, "loss": 1e-5, "grad": 3e-5})  # fmt: skip
    result = run("--model", model, "--data", data, "--loss", "dpo")
    assert result.exit_code == 1
    assert "FAIL" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [(["--loss", "nope"], "unknown loss 'nope'"), (["--dtype", "int8"], "--dtype must be"),
     (["--adapter", "a", "--ref", "r"], "contradict")],
)  # fmt: skip
def test_bad_input(setup, extra, message):
    model, data = setup
    result = run("--model", model, "--data", data, *extra)
    assert result.exit_code == 2 and message in result.output, result.output


def test_defaults_are_the_shipped_model_and_benchmark():
    """No --model and no --data: the shipped tiny model on pairs of the embedded benchmark."""
    result = run("--loss", "tabpo", "--pairs", 2, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pass"] is True
    assert doc["backends"]["torch"]["tabpo"]["metrics"]["logps/chosen"] < 0
