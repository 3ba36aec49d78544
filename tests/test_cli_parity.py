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
    assert doc["pass"] is True and doc["dtype"] == "float32" and doc["k"] == parity_mod.K
    assert set(doc["seconds"]) == {"torch float32", "mlx float32", "torch float64",
                                   "mlx float64"} and doc["total_seconds"] > 0  # fmt: skip
    checks = {c["quantity"]: c for c in doc["checks"]}
    for quantity in ("policy log-probs (chosen)", "reference log-probs (rejected)",
                     "sum c l: gradient (28 tensors)", "tabpo: loss", "tabpo: loss/barrier",
                     "tabpo: dL/dlog-probs", "ipo: dL/dlog-probs"):  # fmt: skip
        assert quantity in checks, sorted(checks)
    loss = checks["tabpo: loss"]
    assert loss["diff"] == pytest.approx(abs(loss["torch"] - loss["mlx"]), abs=1e-12)
    assert loss["diff"] <= parity_mod.K * (loss["torch_error"] + loss["mlx_error"]) + 1e-9


def test_a_failed_check_exits_1(setup, monkeypatch):
    """K = 0: every row whose two float32 values differ at all fails."""
    model, data = setup
    monkeypatch.setattr(parity_mod, "K", 0.0)
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
    logps = next(c for c in doc["checks"] if c["quantity"] == "tabpo: logps/chosen")
    assert logps["torch"] < 0


def test_table_reads_in_120_columns_and_ends_with_the_verdict_and_the_time(setup):
    """Piped output: every row on one line of at most 120 columns, the header says what
    pass means, log-prob rows keep their sign, then the verdict with the worst row, then
    the time of each run."""
    model, data = setup
    result = run("--model", model, "--data", data, "--loss", "dpo", "--loss", "tabpo")
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()  # (a library's loading bar is on stderr)
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert f"pass = |torch - mlx| <= {parity_mod.K:g} x" in result.stdout
    rows = [line for line in lines if line.rstrip().endswith(" pass")][1:]  # after the header
    doc = json.loads(run("--model", model, "--data", data, "--loss", "dpo", "--loss", "tabpo",
                         "--json").stdout)  # fmt: skip
    assert len(rows) == len(doc["checks"])  # one line per check, nothing wrapped
    logps = next(r for r in rows if r.lstrip().startswith("policy log-probs (chosen)"))
    assert float(logps.split()[4]) < 0  # the sequence's total log-prob, with its sign
    worst = max(doc["checks"], key=lambda c: c["ratio"])
    assert lines[-2].startswith(f"PASS: all {len(rows)} rows within {parity_mod.K:g}x"), lines[-2]
    assert f"worst '{worst['quantity']}'" in lines[-2]
    assert "s in all (torch float32" in lines[-1] and "mlx float64" in lines[-1], lines[-1]
