"""Two processes train as one: torchrun (gloo) and mlx.launch (ring over localhost) on CPU.

Each test runs ``tabpo train`` (through ``tests/dist_main.py``) once in one process and once
in two, with the same ``--batch-size`` (per process) and half the accumulation in two, so a
step covers the same pairs in the same order; float32, LoRA dropout 0. 10 pairs, 4 a step:
the third step has 2 pairs, one micro-batch, so rank 1 runs none and adds zero gradients.
Every launch has a timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import adam_close, build_tiny_model, write_pairs
from safetensors.numpy import load_file

MAIN = Path(__file__).with_name("dist_main.py")
TIMEOUT = 240  # seconds per launch; two tiny processes take ~10
LR, STEPS = 1e-2, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    build_tiny_model(root / "model", "llama")
    build_tiny_model(root / "tied", "llama", tie=True)  # full fine-tuning: one tensor, two uses
    write_pairs(root / "train.jsonl", 10)
    write_pairs(root / "eval.jsonl", 3, seed=1)
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, backend: str, args: list[str], *, before: list[str] = ()
) -> subprocess.CompletedProcess:  # noqa: E501
    """``tabpo train ARGS`` in ``world`` processes (no launcher for one)."""
    script = [sys.executable, str(MAIN), *before, "train", "--backend", backend, *args]
    if world == 1:
        cmd = script
    elif backend == "torch":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), *script[1:]]  # fmt: skip
    else:
        cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
               "-n", str(world), "--backend", "ring", "--starting-port", str(_port()),
               "--", *script]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{world} {backend} process(es) still running after {TIMEOUT}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(files: Path, out: Path, world: int, backend: str, finetune: str, *extra: str,
        before: list[str] = ()) -> subprocess.CompletedProcess:  # fmt: skip
    model = files / ("tied" if finetune == "full" else "model")
    args = ["--model", str(model), "--data", str(files / "train.jsonl"),
            "--eval-data", str(files / "eval.jsonl"), "--output", str(out),
            "--finetune", finetune, "--max-steps", str(STEPS), "--learning-rate", str(LR),
            "--warmup-ratio", "0", "--batch-size", "2",
            "--gradient-accumulation-steps", str(2 // world), "--lora-rank", "4",
            "--lora-alpha", "8", "--lora-dropout", "0", "--logging-steps", "1",
            "--eval-steps", "2", "--save-steps", "2", "--ref-cache-dir", str(out) + "-cache",
            *extra]  # fmt: skip
    done = launch(world, backend, args, before=before)
    if not before:
        assert done.returncode == 0, f"{world} {backend} process(es) failed:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """``trained(world, backend, finetune)``: the output of that run, made once per module."""
    done: dict[tuple, Path] = {}

    def get(world: int, backend: str, finetune: str) -> Path:
        key = (world, backend, finetune)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{backend}-{finetune}-w{world}") / "out"
            ran = run(files, out, world, backend, finetune)
            (out.parent / "console.txt").write_text(ran.stdout + ran.stderr)
            done[key] = out
        return done[key]

    return get


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, np.ndarray]:
    final = out / "final"
    file = next(f for f in ("adapter_model.safetensors", "adapters.safetensors",
                            "model.safetensors") if (final / f).is_file())  # fmt: skip
    return load_file(str(final / file))


def compare(one: Path, two: Path, what: str) -> tuple[float, float]:
    """Losses and margins (train and eval, every step; accuracies flip on float noise
    where a margin is 0) to 1e-5 and weights by ``adam_close``; returns
    the largest differences of each."""
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b], f"{what}: different records"
    keys = ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "num_tokens")
    pairs = [(r[k], s[k]) for r, s in zip(a, b, strict=True) for k in keys if k in r]
    loss_diff = max(abs(x - y) for x, y in pairs)
    assert loss_diff <= 1e-5, f"{what}: losses differ by up to {loss_diff:.3g}: {pairs}"
    wa, wb = weights(one), weights(two)
    assert sorted(wa) == sorted(wb), f"{what}: different tensors"
    for k in wa:
        adam_close(wa[k], wb[k], lr=LR, steps=STEPS, what=f"{what} {k}")
    return loss_diff, max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


CASES = [("torch", "lora"), ("torch", "full"), ("mlx", "lora"), ("mlx", "full")]


@pytest.mark.parametrize("backend, finetune", CASES)
def test_two_processes_train_as_one(backend, finetune, trained):
    """Same losses, metrics and weights after 3 steps (one ragged), with evaluation,
    checkpoints and the reference computed by both ranks."""
    one, two = trained(1, backend, finetune), trained(2, backend, finetune)
    loss_diff, weight_diff = compare(one, two, f"{backend} {finetune}")
    print(f"{backend} {finetune}: max |loss diff| {loss_diff:.3g}, max |weight diff| "
          f"{weight_diff:.3g}")  # fmt: skip
    assert records(two)[0]["comm_s"] > 0  # reported for more than one process
    assert "comm_s" not in records(one)[0]
    console = (two.parent / "console.txt").read_text()  # rank 0 alone talks
    for line in ("tabpo train: ", "saved ", "done: 3 steps on 2 processes"):
        n = console.count(line)
        assert n == (2 if line == "saved " else 1), f"{line!r} printed {n} times:\n{console}"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_without_the_gradient_sum_two_processes_differ(backend, files, trained, tmp_path):
    """The equality above needs the sum: each rank stepping on its own gradients ends
    elsewhere (so the test can fail)."""
    done = run(files, tmp_path / "two", 2, backend, "lora", before=["--no-reduce"])
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(AssertionError):
        compare(trained(1, backend, "lora"), tmp_path / "two", backend)


def test_reference_cache_is_written_once_and_keyed_without_the_world_size(trained):
    """Both ranks compute half the reference, rank 0 writes one shard; the one-process run
    finds the same folder and the same values."""
    outs = [trained(n, "torch", "lora") for n in (2, 1)]
    folders = [sorted(Path(f"{out}-cache").iterdir()) for out in outs]
    assert [f.name for f in folders[0]] == [f.name for f in folders[1]], folders
    shards = [sorted(f[0].glob("*.safetensors")) for f in folders]
    assert [len(s) for s in shards] == [2, 2], shards  # train and eval, one shard each
    for a, b in zip(*shards, strict=True):
        ta, tb = load_file(str(a)), load_file(str(b))
        assert sorted(ta) == sorted(tb)
        for k in ta:
            diff = np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()
            assert diff <= 1e-6, f"reference cache {k}: differs by {diff:.3g}"


@pytest.mark.parametrize("backend, finetune", CASES)
def test_two_processes_resume_where_they_stopped(backend, finetune, trained, files, tmp_path):
    """The 2-process run's output, cut back to its checkpoint of step 2 and resumed on 2
    processes: the uninterrupted run's losses and weights. Sharded (FSDP2) full fine-tuning
    resumes from torch.distributed.checkpoint's files."""
    straight = trained(2, backend, finetune)
    if (backend, finetune) == ("torch", "full"):
        assert (straight / "checkpoint-2" / "sharded" / ".metadata").is_file()
    cut = tmp_path / "out"
    shutil.copytree(straight, cut, symlinks=True)
    for late in (cut / "checkpoint-3", cut / ".final-3"):  # what only step 3 wrote goes
        shutil.rmtree(late)
    (cut / "final").unlink()
    kept = [r for r in records(cut) if r["step"] <= 2]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    done = launch(2, backend, ["--resume", str(cut / "checkpoint-2"), "--output", str(cut)])
    assert done.returncode == 0, done.stderr[-3000:]
    compare(straight, cut, f"{backend} {finetune} resumed on 2")


def test_resume_on_another_number_of_processes_is_refused(trained):
    done = launch(2, "torch", ["--resume", str(trained(1, "torch", "lora") / "checkpoint-2")])
    assert done.returncode != 0
    assert "was trained by 1 process(es) and this run has 2" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_failure_on_one_rank_stops_all_with_its_error(backend, files, tmp_path):
    """Rank 1 fails at step 2 while rank 0 waits in the gradient sum: both stop (no hang,
    within the timeout), rank 1's error is printed, and no final weights are published.
    torchrun exits non-zero; mlx.launch 0.32 exits 0 whatever its ranks did."""
    done = run(files, tmp_path / "out", 2, backend, "lora", before=["--fail-rank", "1"])
    assert "error: rank 1: injected failure at step 2 on rank 1" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "final").exists()
    if backend == "torch":
        assert done.returncode != 0
