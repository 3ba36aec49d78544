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


def test_table_reads_in_120_columns_and_ends_with_the_verdict(setup):
    """Piped output: every check on one line of at most 120 columns, the header says what
    pass means, log-prob rows keep their sign, and the last line is the verdict with the
    worst row."""
    model, data = setup
    result = run("--model", model, "--data", data, "--loss", "dpo", "--loss", "tabpo")
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()  # (a library's loading bar is on stderr)
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert "pass = relative difference <= tolerance" in result.stdout
    rows = [line for line in lines if line.rstrip().endswith(" pass")][1:]  # after the header
    doc = json.loads(run("--model", model, "--data", data, "--loss", "dpo", "--loss", "tabpo",
                         "--json").stdout)  # fmt: skip
    assert len(rows) == len(doc["checks"])  # one line per check, nothing wrapped
    logps = next(r for r in rows if r.lstrip().startswith("policy log-probs (chosen)"))
    assert float(logps.split()[4]) < 0  # the sequence's total log-prob, with its sign
    worst = max(doc["checks"], key=lambda c: c["rel_diff"] / c["tolerance"])
    assert lines[-1].startswith(f"PASS: all {len(rows)} checks within tolerance; worst "
                                f"'{worst['quantity']}'")  # fmt: skip
