"""mx.distributed under mlx.launch: the group and the sum of the accumulated gradients.

Data parallel as mlx-lm's trainer does it: every rank holds the whole model, and the
gradient tree is reduced with ``mlx.nn.average_gradients`` (bucketed all-sums), here times
the group's size, because the core scales each micro-batch by its share of the whole step.
"""

from __future__ import annotations

import pickle
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from tabpo.training.parallel import Collectives, Parallel, Single


def from_environment() -> Parallel:
    """The group mlx.launch set up (ring, MPI, ...) when it has more than one rank."""
    if not mx.distributed.is_available():
        return Single()
    group = mx.distributed.init()
    return MlxGroup(group) if group.size() > 1 else Single()


class MlxGroup(Collectives):
    """``Parallel`` on an ``mx.distributed`` group."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group
        self.rank, self.world_size = group.rank(), group.size()

    def gather(self, value: Any) -> list[Any]:
        """Pickled, padded to the longest rank's bytes, and all-gathered."""
        data = np.frombuffer(pickle.dumps(value), dtype=np.uint8)
        sizes = np.zeros(self.world_size, dtype=np.int32)
        sizes[self.rank] = len(data)
        with self.collective():
            sizes = np.array(mx.distributed.all_sum(mx.array(sizes), group=self.group))
            padded = np.zeros(int(sizes.max()), dtype=np.uint8)
            padded[: len(data)] = data
            every = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))
        rows = every.reshape(self.world_size, -1)
        return [pickle.loads(row[:n].tobytes()) for row, n in zip(rows, sizes, strict=True)]

    def barrier(self) -> None:
        with self.collective():
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group))

    def sum_gradients(self, grads: Any) -> Any:
        """The gradient tree summed over the ranks (evaluated, so the time is the sum's)."""
        with self.collective():
            mean = nn.average_gradients(grads, group=self.group)
            summed = tree_map(lambda g: g * self.world_size, mean)
            mx.eval(summed)
        return summed
