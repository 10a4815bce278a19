"""The one distributed module: process group, device, collectives, FSDP2 wrapping, rank-0 work.

- the world: :func:`world`, :func:`is_distributed_env`, :func:`init_process_group` (the one
  process-group helper), :func:`resolve_device`, :func:`barrier`, :func:`destroy`;
- collectives that models and losses share: :func:`gather` (with or without gradient),
  :func:`summed`, :func:`all_reduce_sum`;
- :func:`on_rank0`: run a function on rank 0 and give its result (or its user error) to every
  rank (``eval`` and ``generate`` read resume files this way);
- FSDP2: :func:`shard_module`, :func:`shard_decoder`.

Every collective works in one process without a process group (it is then the identity), so the
same code runs under ``python`` and under torchrun. Merged from ``medtune/training/distributed.py``
and ``medtune/inference.py``'s private ``_world``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from medtune.utils.errors import UserError

__all__ = [
    "all_reduce_sum",
    "barrier",
    "destroy",
    "gather",
    "init_process_group",
    "is_distributed_env",
    "on_rank0",
    "resolve_device",
    "shard_decoder",
    "shard_module",
    "summed",
    "world",
]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` [b, ...] over ranks in rank order -> [N*b, ...] (itself in one process).

    ``with_grad`` keeps the graph: the backward sums every rank's gradient and keeps this rank's
    slice (an all-reduce, which gloo has; ``torch.distributed.nn.all_gather``'s all-to-all
    emulation on gloo did not give the 1-process gradients in
    ``tests/models/test_blip2_qformer.py``). Else the result is detached. Every rank must pass
    the same ``b``."""
    _, n = world()
    if n == 1:
        return x if with_grad else x.detach()
    if with_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, 0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 with the gradient of :func:`gather`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, n = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def summed(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` summed over ranks, without gradient; ``x`` itself in one process."""
    if world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def on_rank0(fn: Callable[[], T], error: type[UserError] = UserError) -> T:
    """``fn()`` on rank 0; its result, or its user error, on every rank.

    Rank 0 alone reads a file that every rank needs (a resume file, a cache): the result is
    broadcast as a Python object. A :class:`UserError` raised on rank 0 is re-raised on every rank
    as ``error`` with the same message, so all ranks stop together (none waits in a collective).
    In one process (or without a process group) it is just ``fn()``.
    """
    rank, size = world()
    if size == 1:
        return fn()
    box: list[Any] = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except UserError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise error(box[1])
    return box[0]


def is_distributed_env() -> bool:
    """True when launched by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(device: torch.device, *, in_one_process: bool = True) -> tuple[int, int]:
    """Join (or create) the default process group. Backend from device: ``nccl`` on CUDA, ``gloo``
    on CPU.

    Args:
        device: this process's device.
        in_one_process: without torchrun, create a group of one (True: the training recipes,
            whose code then runs the same collectives on 1 or N processes) or none (False:
            ``eval``, ``generate``, the sharded judge, which branch on ``world_size`` instead).

    Returns:
        ``(rank, world_size)``.
    """
    if not dist.is_initialized():
        if not in_one_process and not is_distributed_env():
            return 0, 1
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(name: str | None) -> torch.device:
    """``"cpu" | "cuda" | "auto" | None`` -> device; under torchrun on CUDA, the local rank's GPU."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available (use device=cpu)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no-op in one process). Returns the reduced tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_module(module: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 ``fully_shard`` a module (its parameters become DTensor shards; gradients are
    reduce-scattered and averaged over ranks).

    torchao NF4 weights (QLoRA's frozen base) are left out of the sharding and stay whole on
    every rank: with torch 2.14 and torchao 0.15, FSDP2's all-gather of NF4 shards does not give
    back the single-device weights (a QLoRA model's loss differed by about 1% on one rank, and
    some layouts fail inside torchao's ``fsdp_post_all_gather``). The NF4 base costs about 0.56
    bytes per parameter per rank (4.5 GB for 8B).
    """
    from torch.distributed.fsdp import fully_shard

    nf4 = {p for p in module.parameters() if type(p).__name__ == "NF4Tensor"}
    fully_shard(
        module,
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        ignored_params=nf4 or None,
    )
    return module


def shard_decoder(decoder: nn.Module, mesh=None) -> None:
    """FSDP2 per-layer sharding of a torchtune decoder (each layer, then the root)."""
    for layer in decoder.layers:
        shard_module(layer, mesh)
    shard_module(decoder, mesh)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
