"""Data parallelism, decided once: what a process group must offer, and which work is whose.

A launcher (``torchrun``, ``mlx.launch``) starts W processes; the backend joins them to its
library's process group and hands the core a ``Parallel``. The core shards the work and the
backend sums the gradients:

- an optimizer step covers ``batch_size * gradient_accumulation_steps * W`` pairs of the
  epoch's permutation (``--batch-size`` is per process, as in TRL), cut into micro-batches of
  ``batch_size`` in that order; micro-batch m runs on rank ``m % W`` with the gradient scale
  it has in one process (its share of the step's pairs), and the backend's
  ``optimizer_step`` sums the gradients of every rank before it clips and steps. So W
  processes make the step one process makes with ``gradient_accumulation_steps * W``;
- evaluation batches and the batches of pairs whose reference log-probs are not cached are
  dealt out the same way, and every rank gathers the results; every rank runs the same
  number of forwards (``mine``), since a sharded model (FSDP2) gathers its weights in each;
- rank 0 alone writes metrics, the reference cache and the trainer state; checkpoints and
  final weights are written into one temporary directory by every rank (a backend with
  replicated weights writes from rank 0, a sharded one each rank's shard) and renamed into
  place by rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from tabpo.common.errors import TabpoError

T = TypeVar("T")


class Parallel(Protocol):
    """The processes of one run, as a backend's library joins them."""

    rank: int
    world_size: int

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def comm_seconds(self) -> float:
        """Seconds spent in collectives (gradient sums included) since the last call."""


class Single:
    """One process: nothing to gather or wait for."""

    rank = 0
    world_size = 1

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass

    def comm_seconds(self) -> float:
        return 0.0


class Collectives:
    """What the backends' process groups share: the time spent in collectives, and a
    collective that fails because another rank stopped, said in one line."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def collective(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # the libraries' error for a peer that went away
            raise TabpoError(
                f"a collective operation failed ({str(exc).strip()}): another process of "
                f"this run stopped first; its error is printed above"
            ) from None
        finally:
            self.seconds += time.perf_counter() - start

    def comm_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


FILLER = -1  # the position of a filler item: run like the others, its result dropped


def mine(items: Sequence[T], par: Parallel) -> list[tuple[int, T]]:
    """The items this rank takes, with their positions: item m goes to rank ``m % W``.

    Every rank gets ``ceil(n / W)`` entries, so every rank runs the same number of forwards
    (a sharded model's collectives need it): a rank short of one gets item 0 again at
    position ``FILLER``, to run with a zero gradient scale and drop."""
    w = par.world_size
    rounds = -(-len(items) // w)
    return [(m, items[m]) if m < len(items) else (FILLER, items[0])
            for m in range(par.rank, rounds * w, w)]  # fmt: skip


def gathered(par: Parallel, values: Sequence[tuple[int, T]]) -> list[T]:
    """Every rank's ``(position, value)`` pairs, gathered and put back in position order."""
    return [v for _, v in sorted((x for part in par.gather(values) for x in part),
                                 key=lambda x: x[0])]  # fmt: skip
