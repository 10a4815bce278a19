"""Collectives that models and losses share: the world, and gathering a batch across ranks.

Every function works in one process without a process group (it is then the identity), so the
same model code runs under ``python`` and under torchrun. Process-group set-up and FSDP2 wrapping
are :mod:`medtune.training.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather", "summed", "world"]


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
