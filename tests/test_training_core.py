"""Backend-free parts of training: schedule, data order, metrics, reference cache, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tabpo.common.errors import TabpoError
from tabpo.common.files import write_dir
from tabpo.data.batching import collate
from tabpo.data.encoding import EncodedPair
from tabpo.training import refcache
from tabpo.training.checkpoint import TrainerState, resolve_checkpoint, write_state
from tabpo.training.loop import step_pairs
from tabpo.training.schedule import learning_rate, warmup_steps
from tabpo.training.tracking import combine


def test_linear_schedule_by_hand():
    """N = 10, W = ceil(0.1 * 10) = 1, base 1: t=0 -> 0/1 = 0 (HF's first warmup step);
    t=1 -> (10-1)/(10-1) = 1; t=4 -> 6/9; t=9 -> 1/9."""
    w = warmup_steps(10, 0.1)
    assert w == 1
    got = [learning_rate(t, base=1.0, total=10, warmup=w, kind="linear") for t in (0, 1, 4, 9)]
    assert got == pytest.approx([0.0, 1.0, 6 / 9, 1 / 9])


def test_cosine_schedule_by_hand():
    """W = 2, N = 6: t=1 -> 1/2; t=2 -> 1; t=4 -> 0.5 (1 + cos(pi/2)) = 0.5."""
    got = [learning_rate(t, base=2.0, total=6, warmup=2, kind="cosine") for t in (1, 2, 4)]
    assert got == pytest.approx([1.0, 2.0, 1.0])


def test_step_pairs_cover_each_epoch_once_and_are_seeded():
    n, per_step = 10, 3
    epoch = np.concatenate([step_pairs(n, per_step, 7, 0, s) for s in range(math.ceil(n / 3))])
    assert sorted(epoch) == list(range(n))  # the last step is the short remainder
    assert list(step_pairs(n, per_step, 7, 0, 1)) == list(epoch[3:6])
    assert list(step_pairs(n, per_step, 7, 1, 0)) != list(epoch[:3])  # a new epoch reshuffles
    assert list(step_pairs(n, per_step, 8, 0, 0)) != list(epoch[:3])


def test_combine_weights_by_pairs_and_keeps_extremes():
    """(2 pairs, loss 1) + (1 pair, loss 4) -> (2 + 4) / 3 = 2; min/max stay extreme."""
    out = combine([(2, {"loss": 1.0, "delta/min": -1.0, "delta/max": 1.0}),
                   (1, {"loss": 4.0, "delta/min": -3.0, "delta/max": 0.5})])  # fmt: skip
    assert out == {"loss": 2.0, "delta/min": -3.0, "delta/max": 1.0}


def pair(index, prompt, chosen, rejected):
    return EncodedPair(index, index + 1, prompt, chosen, rejected,
                       np.ones(len(chosen)), np.ones(len(rejected)))  # fmt: skip


def test_reference_cache_round_trip_and_stale_key(tmp_path):
    pairs = [pair(0, [1, 2, 3], [4, 5], [6]), pair(1, [1], [7, 8, 9], [4, 4])]
    values = {0: (np.array([-1.0, -2.0]), np.array([-3.0])),
              1: (np.array([-4.0, -5.0, -6.0]), np.array([-7.0, -8.0]))}  # fmt: skip

    def fake_logps(batch):
        out_c = np.zeros(batch.chosen_mask.shape, np.float32)
        out_r = np.zeros(batch.rejected_mask.shape, np.float32)
        for b, i in enumerate(batch.indices):
            out_c[b, batch.chosen_mask[b] > 0] = values[int(i)][0]
            out_r[b, batch.rejected_mask[b] > 0] = values[int(i)][1]
        return out_c, out_r

    table = refcache.compute(fake_logps, pairs, batch_size=1, pad_id=0)
    key = refcache.cache_key("w", pairs, backend="torch", dtype="float32")
    path = tmp_path / "ref.safetensors"
    refcache.save(table, path, key)
    loaded = refcache.load(path, key)
    assert loaded is not None
    batch = collate(pairs[::-1], 0)  # another order and padding than at compute time
    ref_c, ref_r = loaded.for_batch(batch)
    np.testing.assert_array_equal(ref_c[0, batch.chosen_mask[0] > 0], [-4, -5, -6])
    np.testing.assert_array_equal(ref_r[1, batch.rejected_mask[1] > 0], [-3])
    assert ref_c[batch.chosen_mask == 0].tolist() == [0.0] * int((batch.chosen_mask == 0).sum())
    # a different tokenization, weights, backend or dtype is a different key: never used
    other = [pair(0, [1, 2, 3], [4, 5], [6]), pair(1, [1], [7, 8, 9], [4, 5])]
    assert refcache.cache_key("w", other, backend="torch", dtype="float32") != key
    assert refcache.cache_key("w2", pairs, backend="torch", dtype="float32") != key
    assert refcache.cache_key("w", pairs, backend="mlx", dtype="float32") != key
    assert refcache.cache_key("w", pairs, backend="torch", dtype="bfloat16") != key
    assert refcache.load(path, "another-key") is None
    path.write_bytes(path.read_bytes()[:40])  # truncated: ignored, not trusted
    assert refcache.load(path, key) is None


def test_weights_digest_changes_with_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    first = refcache.weights_digest(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert refcache.weights_digest(str(tmp_path)) != first


def test_write_dir_is_atomic(tmp_path):
    target = tmp_path / "checkpoint-1"

    def fill(d):
        (d / "a.txt").write_text("new")

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    write_dir(target, fill)
    with pytest.raises(RuntimeError):
        write_dir(target, broken)
    assert (target / "a.txt").read_text() == "new"  # the complete one survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # no temporary left


def test_resolve_checkpoint_picks_newest(tmp_path):
    for step in (2, 10, 3):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        write_state(d, TrainerState(step=step), "")
    (tmp_path / "checkpoint-11").mkdir()  # incomplete: no trainer_state.json
    assert resolve_checkpoint(tmp_path).name == "checkpoint-10"
    assert resolve_checkpoint(tmp_path / "checkpoint-3").name == "checkpoint-3"
    with pytest.raises(TabpoError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoint-11")
