"""Per-rank estimate of parameter, gradient and optimizer-state memory, from shapes and dtypes.

Computed from each parameter's global shape, dtype and sharding (not from allocated storage), so it
can be printed before the first step and checked against what the step allocates:

- parameters: ``numel * element size``; FSDP2 shards dim 0 into ``ceil(dim0 / world)`` rows per
  rank (padded); an NF4 weight (torchao, QLoRA) counts its real storage: 4-bit codes
  (``numel / 2`` bytes), int8 block scalers (one per 64 values), scaler factors (one per 256
  scalers), one scaler mean and the 16-entry lookup table (those three in the original dtype);
- gradients: one per trainable parameter, same local size and dtype;
- optimizer: slots per trainable parameter by optimizer class (Adam/AdamW: ``exp_avg`` +
  ``exp_avg_sq`` in the parameter's dtype + a 4-byte ``step``; SGD with momentum: one buffer;
  bitsandbytes 8-bit optimizers: 1 byte per slot value).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn


def _is_nf4(p: torch.Tensor) -> bool:
    t = p._local_tensor if hasattr(p, "_local_tensor") else p
    t = t.data if isinstance(t, nn.Parameter) else t
    return type(t).__name__ == "NF4Tensor"


def _nf4_local(p: torch.Tensor):
    t = p._local_tensor if hasattr(p, "_local_tensor") else p
    return t


def nf4_bytes(
    numel: int,
    block_size: int = 64,
    scaler_block_size: int = 256,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Storage of ``numel`` values in torchao's NF4 format.

    Returns:
        Bytes: codes ``numel/2`` + int8 scalers ``numel/block_size`` + factors
        ``numel/block_size/scaler_block_size``, the scaler mean and the 16-entry lookup table, all
        three in the original ``dtype``.
    """
    n_scalers = numel // block_size
    size = torch.finfo(dtype).bits // 8
    return numel // 2 + n_scalers + size * (n_scalers // scaler_block_size) + size + 16 * size


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores for ``p``: a DTensor sharded on dim 0 holds ``ceil(dim0/world)`` rows."""
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):
        from torch.distributed.tensor import Shard

        shape = list(p.shape)
        for dim_size, plc in zip(p.device_mesh.shape, p.placements):
            if isinstance(plc, Shard):
                shape[plc.dim] = math.ceil(shape[plc.dim] / dim_size)
        return math.prod(shape)
    return p.numel()


def _optimizer_slots(optimizer: torch.optim.Optimizer | None) -> tuple[int, int | None, int]:
    """(slots per value, bytes per slot value or None for the param's dtype, bytes per-param scalars)."""
    if optimizer is None:
        return 0, None, 0
    name = type(optimizer).__name__.lower()
    if "8bit" in name:
        return 2, 1, 0
    if "adam" in name:
        return 2, None, 4  # exp_avg, exp_avg_sq; step is a 0-d fp32 tensor
    if "sgd" in name:
        momentum = any(g.get("momentum", 0) for g in optimizer.param_groups)
        return (1 if momentum else 0), None, 0
    return 2, None, 0


def estimate_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, world_size: int = 1
) -> dict[str, dict[str, int]]:
    """Bytes per rank of parameters, gradients and optimizer state, by dtype.

    Args:
        model: the model as it will train (after sharding and freezing).
        optimizer: the optimizer (its class sets the state slots); None: no optimizer state.
        world_size: number of ranks (for the printed note; sharding is read from the parameters).

    Returns:
        ``{"params": {dtype: bytes}, "grads": {...}, "optimizer": {...}}``; NF4 weights are listed
        under ``"nf4"``.
    """
    slots, slot_bytes, scalars = _optimizer_slots(optimizer)
    out: dict[str, dict[str, int]] = {
        "params": defaultdict(int),
        "grads": defaultdict(int),
        "optimizer": defaultdict(int),
    }
    for p in model.parameters():  # shared parameters are listed once
        n = local_numel(p)
        if _is_nf4(p):
            t = _nf4_local(p)
            out["params"]["nf4"] += nf4_bytes(n, t.block_size, t.scaler_block_size, t.dtype)
            continue
        dtype = str(p.dtype).removeprefix("torch.")
        size = (
            p.element_size() if not hasattr(p, "_local_tensor") else p._local_tensor.element_size()
        )
        out["params"][dtype] += n * size
        if p.requires_grad:
            out["grads"][dtype] += n * size
            if slots:
                key = dtype if slot_bytes is None else "uint8"
                out["optimizer"][key] += slots * n * (size if slot_bytes is None else slot_bytes)
            if scalars:
                out["optimizer"]["float32"] += scalars
    return {k: dict(v) for k, v in out.items()}


def total_bytes(est: dict[str, dict[str, int]]) -> int:
    """Sum of every entry of an :func:`estimate_memory` result."""
    return sum(sum(v.values()) for v in est.values())


def _gib(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_memory(est: dict[str, dict[str, int]], world_size: int = 1) -> str:
    """A short text table of an :func:`estimate_memory` result."""
    lines = [f"memory estimate per rank ({world_size} rank(s); activations not included):"]
    for kind in ("params", "grads", "optimizer"):
        by = est.get(kind, {})
        detail = ", ".join(f"{d} {_gib(b)}" for d, b in sorted(by.items())) or "-"
        lines.append(f"  {kind:<9} {_gib(sum(by.values())):>12}  ({detail})")
    lines.append(f"  {'total':<9} {_gib(total_bytes(est)):>12}")
    return "\n".join(lines)


def allocated_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """What is actually allocated on this rank: ``untyped_storage().nbytes()`` summed over the
    parameters (NF4: its inner tensors), their gradients and the optimizer state (each storage
    counted once).

    Returns:
        ``{"params": bytes, "grads": bytes, "optimizer": bytes}``.
    """
    seen: set[int] = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        if hasattr(t, "_local_tensor"):
            t = t._local_tensor
        if type(t).__name__ == "NF4Tensor" or (isinstance(t, nn.Parameter) and _is_nf4(t)):
            inner = t.data if isinstance(t, nn.Parameter) else t
            return sum(nbytes(getattr(inner, a)) for a in inner.__tensor_flatten__()[0])
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            return 0
        seen.add(s.data_ptr())
        return s.nbytes()

    out = {
        "params": sum(nbytes(p) for p in model.parameters()),
        "grads": sum(nbytes(p.grad) for p in model.parameters()),
    }
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            opt += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    out["optimizer"] = opt
    return out
