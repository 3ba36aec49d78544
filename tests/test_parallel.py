"""The core's split of work across processes (tabpo.training.parallel), without processes."""

from __future__ import annotations

from tabpo.training.parallel import FILLER, Single, gathered, mine


class Rank:
    """Rank ``rank`` of ``world`` whose gather returns what ``others`` say each rank sent."""

    def __init__(self, rank: int, world: int, others: dict[int, object] | None = None):
        self.rank, self.world_size, self.others = rank, world, others or {}

    def gather(self, value):
        return [value if r == self.rank else self.others[r] for r in range(self.world_size)]


def test_items_are_dealt_round_robin_and_every_rank_gets_as_many():
    """5 micro-batches on 2 ranks: rank 0 takes 0, 2, 4; rank 1 takes 1, 3 and a filler
    (item 0 again), so both run 3 forwards."""
    items = ["a", "b", "c", "d", "e"]
    assert mine(items, Rank(0, 2)) == [(0, "a"), (2, "c"), (4, "e")]
    assert mine(items, Rank(1, 2)) == [(1, "b"), (3, "d"), (FILLER, "a")]
    assert mine(items[:1], Rank(1, 2)) == [(FILLER, "a")]  # a ragged last step
    assert mine([], Rank(1, 2)) == []
    assert mine(items, Single()) == list(enumerate(items))


def test_gathered_results_come_back_in_step_order():
    rank1 = [(1, "b"), (3, "d")]
    assert gathered(Rank(0, 2, {1: rank1}), [(0, "a"), (2, "c"), (4, "e")]) == list("abcde")
