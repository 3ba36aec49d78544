"""torch.distributed under torchrun: the process group and the sum of the trained gradients.

The forward calls the decoder and the LM head directly, never the wrapped model's own
``forward``, so a ``DistributedDataParallel`` wrapper would see no forward and skip its
all-reduce without a word. The gradients are summed explicitly instead, after the last
micro-batch of a step and before clipping, over every trained parameter (a tied embedding is
one parameter holding both uses' gradient): correct whatever path the forward takes.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tabpo.training.parallel import Collectives, Parallel, Single

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size: one all-reduce per ~25 MiB


def from_environment() -> Parallel:
    """The torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Single()
    return TorchGroup()


def local_device() -> torch.device | None:
    """This rank's GPU under torchrun (``LOCAL_RANK``), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class TorchGroup(Collectives):
    """``Parallel`` on the default torch.distributed process group."""

    def __init__(self) -> None:
        super().__init__()
        device = local_device()
        if device is not None:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device is not None else "gloo")
            atexit.register(_destroy)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self.collective():
            dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        with self.collective():
            dist.barrier()

    def sum_gradients(self, params: list[Tensor]) -> None:
        """``p.grad`` summed over the ranks, in place, in buckets of ``BUCKET_BYTES``; a
        parameter without a gradient on this rank adds zeros."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with self.collective():
            for bucket in _buckets([p.grad for p in params if p.grad is not None]):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                    g.copy_(part.view_as(g))
            if params and params[0].is_cuda:  # NCCL returns at once: time the sum itself
                torch.cuda.synchronize()


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive gradients of one dtype and device, about ``BUCKET_BYTES`` per bucket."""
    out: list[list[Tensor]] = []
    size = 0
    for g in grads:
        same = out and (out[-1][0].dtype, out[-1][0].device) == (g.dtype, g.device)
        if not same or size >= BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.numel() * g.element_size()
    return out


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
