"""Data loading for the training recipes: a sampler that resumes mid-epoch, no global RNG draws.

Exact resume needs every random draw of the data path to come from somewhere the recipe state
restores. Here:

- the order of an epoch comes from ``DistributedSampler`` seeded by ``(seed, epoch)`` (the same on
  every rank; each rank takes its share);
- the DataLoader gets its own ``torch.Generator`` (``iter(DataLoader)`` would otherwise draw its
  workers' base seed from the global torch RNG, shifting dropout after a resume);
- the item-level randomness (template sampling, augmentation) is seeded per ``(seed, epoch,
  index)`` by the model transform, so ``num_workers`` and worker seeds do not matter.

On resume the sampler skips the batches already done in the epoch (:class:`ResumableSampler`,
or the length-grouped batch sampler). Packed rows are fixed for the run and shuffled per epoch
like samples.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler`'s indices for one epoch, after skipping the batches done.

    Args:
        base: the per-rank sampler (its ``set_epoch`` fixes the order).
        batch_size: per-rank batch size (skips are counted in batches).
    """

    def __init__(self, base: Sampler[int], batch_size: int) -> None:
        self.base, self.batch_size, self.skip = base, batch_size, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of ``epoch``; the first ``skip`` batches (already trained on) are left out."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        self.skip = skip * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.skip :])

    def __len__(self) -> int:
        return len(self.base) - self.skip  # type: ignore[arg-type]


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pad_id: int | None = None,
    collate_fn: Any = None,
    packed: bool = False,
    max_seq_len: int | None = None,
    group_by_length: bool = False,
    dense_mask: bool = True,
) -> tuple[Dataset, DataLoader, Any]:
    """A DataLoader whose epochs are reproducible and resumable, in one of three batchings.

    - padded (default): samples in a seeded order, each batch right-padded to its longest;
    - ``packed``: samples concatenated into rows of ``max_seq_len`` tokens with their images
      (:class:`medtune.data.packing.PackedDataset`; block-diagonal causal attention, positions
      restarting per sample); ``batch_size`` counts rows;
    - ``group_by_length``: batches of samples of similar length
      (:class:`medtune.data.sampling.LengthGroupedBatchSampler`).

    Args:
        dataset: map-style dataset of items (``tokens``, ``labels``, ``images``, ...).
        batch_size: per-rank batch size (rows when packed).
        shuffle: shuffle each epoch (seeded by ``seed`` and the epoch).
        seed: the run's seed (the same on every rank).
        rank, world_size: this process's share of each epoch.
        num_workers: DataLoader worker processes.
        pad_id: the tokenizer's padding id (MedVLM items: padded or packed collate).
        collate_fn: any other collate (image-text pairs, ...), instead of ``pad_id``.
        packed, max_seq_len: pack rows of ``max_seq_len`` tokens.
        group_by_length: length-grouped batches (not with ``packed``).
        dense_mask: packed batches carry a dense [b, S, S] mask (False on CUDA, where the recipe
            builds a flex-attention BlockMask from ``seq_lens``).

    Returns:
        ``(dataset, loader, sampler)``: ``dataset`` is the packed view when packed; call
        ``sampler.set_epoch(epoch, skip=batches_done)`` before iterating an epoch.
    """
    from medtune.data.collate import collate_vision_chat
    from medtune.data.packing import PackedDataset, collate_packed, token_lengths
    from medtune.data.sampling import LengthGroupedBatchSampler
    from medtune.utils.errors import ConfigError

    if packed and group_by_length:
        raise ConfigError("packed / group_by_length: choose one (packing already fills rows)")
    if (pad_id is None) == (collate_fn is None):
        raise TypeError("build_dataloader: give pad_id (MedVLM items) or collate_fn, not both")
    collate = collate_fn or functools.partial(collate_vision_chat, pad_id=pad_id)
    if packed:
        if not max_seq_len:
            raise ConfigError("max_seq_len: packed: true needs max_seq_len (the row length)")
        dataset = PackedDataset(dataset, max_seq_len, seed=seed)
        collate = functools.partial(
            collate_packed, pad_id=pad_id, seq_len=max_seq_len, dense_mask=dense_mask
        )
    generator = torch.Generator().manual_seed(seed)  # no draw from the global RNG
    if group_by_length:
        batches = LengthGroupedBatchSampler(
            token_lengths(dataset),
            batch_size,
            world_size=world_size,
            rank=rank,
            seed=seed,
            shuffle=shuffle,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=collate,
            generator=generator,
        )
        return dataset, loader, batches
    base = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    sampler = ResumableSampler(base, batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
    )
    return dataset, loader, sampler
