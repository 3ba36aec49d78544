"""--report-to: TensorBoard event files and a Weights & Biases run (offline) hold the same
numbers as metrics.jsonl, read back from the files each library wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import write_pairs

from tabpo.backends import get_backend
from tabpo.common.errors import TabpoError
from tabpo.training import config as cfg
from tabpo.training.loop import train

pytest.importorskip("torch")


def metrics(out: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): float(v) for r in rows for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}  # fmt: skip


def records(data: bytes, start: int, block: int = 0) -> list[bytes]:
    """Length-prefixed records: TFRecord (block 0: u64 length, u32 crc, data, u32 crc) or
    LevelDB's log format in 32 KiB blocks (W&B's: u32 crc, u16 length, u8 kind, data)."""
    out, pos, pending = [], start, b""
    while pos < len(data):
        if not block:
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            out.append(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            continue
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending = data[pos + 7 : pos + 7 + length] if kind in (1, 2) else pending + data[
            pos + 7 : pos + 7 + length]  # fmt: skip
        if kind in (1, 4):
            out.append(pending)
        pos += 7 + length
    return out


def run(tmp_path, model, report_to):
    c = cfg.build({}, {"model": str(model), "data": str(write_pairs(tmp_path / "d.jsonl", 4)),
                       "eval_data": str(write_pairs(tmp_path / "e.jsonl", 2, seed=1)),
                       "eval_steps": 2, "output": str(tmp_path / "out"), "backend": "torch",
                       "max_steps": 3, "batch_size": 2, "lora_rank": 4, "report_to": report_to,
                       "ref_cache_dir": str(tmp_path / "cache")})  # fmt: skip
    train(c, get_backend("torch"))
    return tmp_path / "out"


def test_tensorboard_holds_the_values_of_metrics_jsonl(tiny_model, tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event

    out = run(tmp_path, tiny_model(), "tensorboard")
    got = {}
    for file in (out / "runs").glob("events.out.tfevents.*"):
        for raw in records(file.read_bytes(), 0):
            event = Event.FromString(raw)
            for value in event.summary.value:
                got[(event.step, value.tag)] = value.simple_value
    want = metrics(out)
    assert set(got) == set(want), sorted(set(want) ^ set(got))[:5]
    worst = max(abs(got[k] - v) / max(abs(v), 1e-30) for k, v in want.items())
    assert worst <= 1e-6, f"TensorBoard differs from metrics.jsonl by {worst:.2e} (float32)"
    assert {"loss", "eval_loss", "peak_rss_gb"} <= {tag for _, tag in got}


def test_wandb_offline_run_holds_the_values_of_metrics_jsonl(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(tmp_path, tiny_model(), "wandb")
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    got = {}
    for raw in records(log.read_bytes(), 7, block=32768):  # after W&B's 7-byte header
        record = pb.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {i.nested_key[0]: json.loads(i.value_json) for i in record.history.item}
            got.update({(row["_step"], k): float(v) for k, v in row.items()
                        if not k.startswith("_")})  # fmt: skip
    want = metrics(out)
    assert set(got) == set(want), sorted(set(want) ^ set(got))[:5]
    worst = max(abs(got[k] - v) / max(abs(v), 1e-30) for k, v in want.items())
    assert worst == 0.0, f"W&B differs from metrics.jsonl by {worst:.2e}"


def test_an_unknown_or_missing_logger_is_one_line_before_any_model(tmp_path, monkeypatch):
    import importlib.util

    from tabpo.training.loop import check

    c = {"model": "m", "data": "d.jsonl", "output": str(tmp_path / "o")}
    with pytest.raises(TabpoError, match="--report-to: unknown 'mlflow'"):
        cfg.build({}, {**c, "report_to": "mlflow"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    with pytest.raises(TabpoError, match="--report-to wandb needs the wandb package"):
        check(cfg.build({}, {**c, "report_to": "wandb,tensorboard"}))
