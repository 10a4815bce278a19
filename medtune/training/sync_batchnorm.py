"""Batch norm over the global batch on any backend (gloo on CPU included).

``torch.nn.SyncBatchNorm`` runs on GPUs only. :class:`GlobalBatchNorm2d` is a ``BatchNorm2d`` (same
parameter and buffer names, so checkpoints do not change) whose training statistics are summed
across ranks with a differentiable all-reduce; with one process it is ``BatchNorm2d`` exactly.
With it, N ranks x B images normalise as one process with N*B (MAVL itself trains with per-rank
statistics: plain DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` with statistics over every rank's batch while training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        import torch.distributed.nn.functional as dnn

        n_local = x.new_tensor(float(x.numel() // x.shape[1]))
        stats = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), n_local.view(1)])
        stats = dnn.all_reduce(stats)  # backward: the gradients of every rank summed
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``BatchNorm2d`` of ``module`` into a :class:`GlobalBatchNorm2d` in place (weights
    and running statistics kept). Returns ``module``."""
    for bn in [m for m in module.modules() if type(m) is nn.BatchNorm2d]:
        bn.__class__ = GlobalBatchNorm2d
    return module


__all__ = ["GlobalBatchNorm2d", "convert_global_batchnorm"]
