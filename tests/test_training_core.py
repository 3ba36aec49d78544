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


def fake_reference(values):
    """A backend's ``logps(batch, reference=True)`` that returns ``values[pair index]``,
    counting the pairs it was asked for."""
    asked = []

    def logps(batch):
        out_c = np.zeros(batch.chosen_mask.shape, np.float32)
        out_r = np.zeros(batch.rejected_mask.shape, np.float32)
        for b, i in enumerate(batch.indices):
            out_c[b, batch.chosen_mask[b] > 0] = values[int(i)][0]
            out_r[b, batch.rejected_mask[b] > 0] = values[int(i)][1]
            asked.append(int(i))
        return out_c, out_r

    return logps, asked


PAIRS = [pair(0, [1, 2, 3], [4, 5], [6]), pair(1, [1], [7, 8, 9], [4, 4]),
         pair(2, [2, 2], [5], [5, 6])]  # fmt: skip
VALUES = {0: ([-1.0, -2.0], [-3.0]), 1: ([-4.0, -5.0, -6.0], [-7.0, -8.0]),
          2: ([-9.0], [-10.0, -11.0])}  # fmt: skip


def cached_table(store, pairs, values):
    """What the loop does: the cache's entries, the missing ones computed and added."""
    logps, asked = fake_reference(values)
    entries = store.lookup(pairs)
    missing = [p for p in pairs if p.index not in entries]
    if missing:
        computed = refcache.compute(logps, missing, batch_size=2, pad_id=0)
        store.add(missing, computed)
        entries.update(computed.entries)
    return refcache.RefTable(entries), asked


def test_reference_cache_round_trip(tmp_path):
    store = refcache.Store(tmp_path / "k", "k")
    table, asked = cached_table(store, PAIRS, VALUES)
    assert sorted(asked) == [0, 1, 2]
    again, asked = cached_table(refcache.Store(tmp_path / "k", "k"), PAIRS, VALUES)
    assert asked == []  # every entry from the disk
    batch = collate(PAIRS[::-1], 0)  # another order and padding than at compute time
    ref_c, ref_r = again.for_batch(batch)
    np.testing.assert_array_equal(ref_c[1, batch.chosen_mask[1] > 0], [-4, -5, -6])
    np.testing.assert_array_equal(ref_r[2, batch.rejected_mask[2] > 0], [-3])
    assert ref_c[batch.chosen_mask == 0].tolist() == [0.0] * int((batch.chosen_mask == 0).sum())


def test_reference_cache_is_keyed_by_content_not_position(tmp_path):
    """The data set loses its first line (every later pair's index shifts, as when a line
    that encoding skipped is deleted), is reordered, and gains a new pair: each kept pair
    gets its own values from the cache, only the new pair is computed."""
    store = refcache.Store(tmp_path / "k", "k")
    cached_table(store, PAIRS, VALUES)
    new = pair(2, [3], [1, 1], [2])
    shifted = [pair(0, [2, 2], [5], [5, 6]), pair(1, [1], [7, 8, 9], [4, 4]), new]
    values = {0: VALUES[2], 1: VALUES[1], 2: ([-12.0, -13.0], [-14.0])}
    table, asked = cached_table(store, shifted, values)
    assert asked == [2]  # only the new pair
    for p in shifted:
        batch = collate([p], 0)
        ref_c, ref_r = table.for_batch(batch)
        np.testing.assert_array_equal(ref_c[0, batch.chosen_mask[0] > 0], values[p.index][0])
        np.testing.assert_array_equal(ref_r[0, batch.rejected_mask[0] > 0], values[p.index][1])


def test_reference_cache_never_trusts_another_reference_or_a_broken_shard(tmp_path):
    cached_table(refcache.Store(tmp_path / "k", "k"), PAIRS, VALUES)
    (shard,) = (tmp_path / "k").glob("*.safetensors")
    assert refcache.Store(tmp_path / "k", "another-key").lookup(PAIRS) == {}
    shard.write_bytes(shard.read_bytes()[:40])  # truncated: ignored, not trusted
    assert refcache.Store(tmp_path / "k", "k").lookup(PAIRS) == {}


def test_reference_cache_keys_cover_what_the_values_depend_on():
    """A different tokenization of either side, or another weights/backend/dtype, is
    another key; the index and line of a pair are not part of it."""
    base = refcache.pair_key(PAIRS[0])
    assert refcache.pair_key(pair(7, [1, 2, 3], [4, 5], [6])) == base
    for other in (pair(0, [1, 2], [3, 4, 5], [6]), pair(0, [1, 2, 3], [4, 5], [7]),
                  pair(0, [1, 2, 3], [4, 5, 6], [])):  # fmt: skip
        assert refcache.pair_key(other) != base
    key = refcache.model_key("w", backend="torch", dtype="float32")
    assert refcache.model_key("w2", backend="torch", dtype="float32") != key
    assert refcache.model_key("w", backend="mlx", dtype="float32") != key
    assert refcache.model_key("w", backend="torch", dtype="bfloat16") != key


def test_a_hub_id_is_keyed_by_its_resolved_revision(tmp_path, monkeypatch):
    """A local snapshot in the Hugging Face cache layout: a new upstream revision (refs/main
    moved) is another digest, the same revision the same one."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--org--tiny"

    def point_main_at(commit):
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    point_main_at("a" * 40)
    first = refcache.weights_digest("org/tiny")
    assert refcache.weights_digest("org/tiny") == first
    point_main_at("b" * 40)
    assert refcache.weights_digest("org/tiny") != first
    with pytest.raises(TabpoError, match="org/absent: no local snapshot"):
        refcache.weights_digest("org/absent")


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
