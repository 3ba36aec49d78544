"""`tabpo train` through Typer's CliRunner: config file and flags, and every bad input."""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_model, write_pairs
from typer.testing import CliRunner

from tabpo.cli.app import app
from tabpo.common.files import OutputDir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture
def args(model_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", 4)
    return ["train", "--backend", "torch", "--model", str(model_dir), "--data", str(data),
            "--output", str(tmp_path / "out"), "--ref-cache-dir", str(tmp_path / "cache"),
            "--lora-rank", "4"]  # fmt: skip


def run(argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


def test_yaml_config_and_flag_override(args, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss_type: dpo\nmax-steps: 5\nbeta: 0.2\nbatch_size: 2\n"
                      "gradient_accumulation_steps: 1\n")  # fmt: skip
    result = run([*args, "--config", config, "--max-steps", 2])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the flag beat the file's 5
    saved = (out / "config.yaml").read_text()
    assert "loss: dpo" in saved and "beta: 0.2" in saved
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()


def test_help_groups_options():
    result = run(["train", "--help"])
    assert result.exit_code == 0
    for panel in ("Model", "Data", "Loss", "LoRA", "Optimizer", "Output"):
        assert panel in result.output
    assert "--barrier-weight" in result.output and "--precompute-ref" in result.output


def broken_family(model_dir, tmp_path):
    copy = tmp_path / "gpt"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return copy


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-target-modules", "q_proj,fc_in"], "LoRA target module 'fc_in'"),
        (["--loss", "tdpo", "--precompute-ref"], "needs the full-vocabulary KL"),
        (["--loss", "dpo", "--tau", "0.9"], "loss 'dpo' has no hyperparameter 'tau'"),
        (["--backend", "jax"], "--backend must be one of"),
        (["--prefix-sharing", "always"], "--prefix-sharing must be one of auto, on, off"),
        (["--model", "/nonexistent/model"], "model directory not found"),
        (["--config", "/nonexistent.yaml"], "cannot read config"),
    ],
)
def test_bad_input_one_line_nothing_written(args, tmp_path, extra, message):
    result = run([*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unsupported_family_and_bad_data_line(args, model_dir, tmp_path):
    result = run([*args, "--model", broken_family(model_dir, tmp_path)])
    assert result.exit_code == 2 and "model_type 'gpt2' is not supported" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    result = run([*args, "--data", bad])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing data", "malformed data", "existing output"])
def test_what_needs_no_model_is_checked_before_any_is_loaded(args, tmp_path, monkeypatch,
                                                             problem):  # fmt: skip
    """A missing or malformed data file and an existing output directory are reported before
    the tokenizer, the backend or the model load (each would fail the test if reached)."""
    import tabpo.backends
    import tabpo.training.loop

    def reached(*_, **__):
        raise AssertionError("a tokenizer or backend was loaded before the cheap checks")

    monkeypatch.setattr(tabpo.backends, "get_backend", reached)
    monkeypatch.setattr(tabpo.training.loop, "load_tokenizer", reached)
    argv = list(args)
    if problem == "missing data":
        argv[argv.index("--data") + 1] = tmp_path / "absent.jsonl"
        message = "absent.jsonl: file not found"
    elif problem == "malformed data":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{x\n')
        argv[argv.index("--data") + 1] = tmp_path / "bad.jsonl"
        message = "bad.jsonl:2"
    else:
        OutputDir(tmp_path / "out").record("metrics.jsonl")
        message = "exists (use --force or --resume"
    one_line_error(run(argv), [message])


def test_a_directory_tabpo_did_not_write_is_never_replaced(args, tmp_path):
    """`--output runs --force` where runs/ holds other runs (or anything of the user's):
    refused in one line, with or without --force, and nothing in it is touched."""
    out = tmp_path / "out"
    (out / "run-1").mkdir(parents=True)
    (out / "run-1" / "metrics.jsonl").write_text("mine\n")
    (out / "notes.txt").write_text("keep")
    for force in ([], ["--force"]):
        result = run([*args, *force])
        assert result.exit_code == 2 and "not written by tabpo" in result.output, result.output
    assert sorted(p.name for p in out.rglob("*")) == ["metrics.jsonl", "notes.txt", "run-1"]


def test_force_replaces_only_what_tabpo_wrote(args, tmp_path):
    out = tmp_path / "out"
    assert run([*args, "--max-steps", 2, "--save-steps", 1]).exit_code == 0
    (out / "notes.txt").write_text("keep")  # the user's, inside a tabpo output directory
    result = run([*args, "--max-steps", 1])
    assert result.exit_code == 2 and "exists (use --force or --resume" in result.output
    # --force with a run that cannot start loses nothing either
    result = run([*args, "--force", "--lora-target-modules", "nope"])
    assert result.exit_code == 2 and (out / "checkpoint-1").is_dir()
    result = run([*args, "--force", "--max-steps", 1])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep"
    assert not (out / "checkpoint-2").exists()  # the old run's entries are gone
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(args, tmp_path):
    """A real SIGINT to `tabpo train`: it finishes the step, saves, says so once and exits
    130 (a stopped run is not a finished one); --resume with the output directory alone
    continues to the planned step count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = [sys.executable, "-c", "from tabpo.cli.app import main; main()", *args,
            "--max-steps", "400", "--loss", "sft", "--batch-size", "1",
            "--gradient-accumulation-steps", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "120"})  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert output.count("stopped at step") == 1, output
    checkpoints = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < 400
    result = run(["train", "--resume", out, "--max-steps", stopped_at + 2])
    assert result.exit_code == 0, result.output
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
    assert (out / "adapter_model.safetensors").is_file()


def cut(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(len(path.read_bytes()) * keep)])


def one_line_error(result, names):
    """Exit code 2, no traceback, one error line that names the file."""
    clean = result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2 and clean, f"not a clean error: {result.exception!r}"
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert all(n in errors[0] for n in names), f"{errors[0]!r} does not name {names}"


DAMAGE = {  # file -> (how to damage it, what the line must say)
    "no-config": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), ["no model*.safetensors"]),
    "header cut": (lambda d: cut(d / "model.safetensors", 0.0001), ["model.safetensors"]),
    "data cut": (lambda d: cut(d / "model.safetensors", 0.9), ["model.safetensors", "truncated"]),
    "tokenizer.json": (lambda d: (d / "tokenizer.json").write_text("{oops"),
                       ["tokenizer.json:1", "invalid JSON"]),
    "tokenizer_config.json": (lambda d: (d / "tokenizer_config.json").write_text("[1,"),
                              ["tokenizer_config.json"]),
    "template raises": (lambda d: (d / "chat_template.jinja").write_text(
        "{{ raise_exception('system role not supported') }}"),
        ["train.jsonl: line 1", "chat template", "system role not supported"]),
    "template syntax": (lambda d: (d / "chat_template.jinja").write_text("{% for %}"),
                        ["chat template", "TemplateSyntaxError"]),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_model_directory(args, model_dir, tmp_path, damage):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    spoil, names = DAMAGE[damage]
    spoil(copy)
    one_line_error(run([*args, "--model", copy]), names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend, file, spoil", [
    ("torch", "adapter_model.safetensors", cut),
    ("torch", "optimizer.pt", cut),
    ("torch", "rng.pt", lambda p: p.write_bytes(b"garbage")),
    ("mlx", "adapters.safetensors", cut),
    ("mlx", "optimizer.safetensors", lambda p: p.write_bytes(b"garbage")),
    ("mlx", "rng_state.json", cut),
])  # fmt: skip
def test_damaged_checkpoint_is_one_line(args, tmp_path, backend, file, spoil):
    argv = [*[a if a != "torch" else backend for a in args], "--max-steps", 2, "--save-steps", 1]
    assert run(argv).exit_code == 0
    spoil(tmp_path / "out" / "checkpoint-1" / file)
    one_line_error(run([*argv, "--resume", tmp_path / "out" / "checkpoint-1"]),
                   [f"checkpoint-1/{file}"])  # fmt: skip


def test_mlx_lm_flags_that_map_cleanly(args, tmp_path):
    """--iters and --adapter-path (mlx-lm's) mean --max-steps and --output."""
    argv = [a for a in args if a not in ("--output", str(tmp_path / "out"))]
    result = run([*argv, "--iters", 2, "--adapter-path", tmp_path / "adapters",
                  "--grad-checkpoint"])  # fmt: skip
    assert result.exit_code == 0, result.output
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "adapters" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == [1, 2]
    assert "gradient_checkpointing: true" in (tmp_path / "adapters" / "config.yaml").read_text()
