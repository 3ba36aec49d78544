"""torch.distributed under torchrun: the process group, the sum of the trained gradients,
and FSDP2 for full fine-tuning.

The forward calls the decoder and the LM head directly, never the wrapped model's own
``forward``, so a ``DistributedDataParallel`` wrapper would see no forward and skip its
all-reduce without a word. The gradients are summed explicitly instead, after the last
micro-batch of a step and before clipping, over every trained parameter (a tied embedding is
one parameter holding both uses' gradient): correct whatever path the forward takes.
Full fine-tuning on several processes shards the model with FSDP2 instead (``shard``),
whose reduce-scatter after each backward replaces that sum.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from tabpo.training.parallel import Collectives, Parallel, Single

T = TypeVar("T")
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


# -- FSDP2: full fine-tuning with the weights, gradients and optimizer state sharded -------

FORWARD = "tabpo_forward"  # the root module's method that runs our forward under FSDP


def shard(model: nn.Module) -> None:
    """``fully_shard`` every decoder layer, then the model (its root group: the embedding, a
    tied or untied head, the final norm). Our forward calls the decoder and the head
    directly, so it runs through ``FORWARD``, registered as an FSDP forward method: the root
    group is gathered around it and its gradients reduce-scattered after the backward."""
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    setattr(model, FORWARD, lambda fn: fn())
    register_fsdp_forward_method(model, FORWARD)


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def run(model: nn.Module, fn: Callable[[], T]) -> T:
    """``fn()`` (a forward through ``model``'s decoder and head) under FSDP's hooks when
    ``model`` is sharded."""
    if not is_sharded(model):
        return fn()
    out = getattr(model, FORWARD)(fn)
    if not torch.is_grad_enabled():  # the root group stays gathered for a backward: none comes
        model.reshard()
    return out


def full_tensor(t: Tensor) -> Tensor:
    """A sharded tensor gathered whole (a collective: every rank calls it); others as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (whole) laid out like ``param``: this rank's shard of a sharded one."""
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of a sharded model, whole, on rank 0's CPU (a collective), under the
    names ``save_pretrained`` writes: a tied head is the embedding, not a tensor of its own."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in own}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Model and optimizer state, each rank its shards (``torch.distributed.checkpoint``)."""
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer)}  # fmt: skip
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer)}  # fmt: skip
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
