"""``python tests/dist_main.py [--no-reduce] [--fail-rank R] train ...``: the tabpo command
line as the multi-process tests launch it. ``--no-reduce`` removes the gradient sum across
ranks (the equality tests must then fail); ``--fail-rank R`` makes rank R raise at its second
step (the launcher must then stop every rank with that error)."""

from __future__ import annotations

import sys


def remove_reduction() -> None:
    from tabpo.backends import _mlx_dist, _torch_dist

    _torch_dist.TorchGroup.sum_gradients = lambda self, params: None  # type: ignore[method-assign]
    _mlx_dist.MlxGroup.sum_gradients = lambda self, grads: grads  # type: ignore[method-assign]


def fail_on(rank: int) -> None:
    from tabpo.cli.common import launched_rank
    from tabpo.common.errors import TabpoError
    from tabpo.training.run import Run

    step = Run.step

    def failing(self: Run) -> dict[str, float]:
        if self.state.step == 1 and launched_rank() == rank:
            raise TabpoError(f"injected failure at step 2 on rank {rank}")
        return step(self)

    Run.step = failing  # type: ignore[method-assign]


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--no-reduce":
        args = args[1:]
        remove_reduction()
    if args[0] == "--fail-rank":
        fail_on(int(args[1]))
        args = args[2:]
    from tabpo.cli.app import main

    sys.argv = ["tabpo", *args]
    main()
