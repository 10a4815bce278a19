"""Length-grouped batching (``group_by_length: true``): batches of samples of similar length.

LLaVA's ``group_by_modality_length`` idea, the simpler alternative to packing: a random
permutation is cut into megabatches of ``batch_size * world_size * megabatch_mult`` samples, each
megabatch is sorted by length and cut into batches, so a batch pads little; the order of the
batches is then shuffled, so training still sees lengths in random order. Consecutive batches of a
sorted megabatch go to the ranks of one step, so ranks wait little on each other.

(LLaVA also separates image and text-only samples; medtune keeps them mixed, because under FSDP a
batch without images on one rank while another rank has images cannot run the sharded encoders.)

Deterministic by (seed, epoch); each rank takes its share, every rank gets the same number of
batches (the last step is completed with batches from the start of the epoch, as
``DistributedSampler(drop_last=False)`` repeats samples); resumable by skipping batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices of similar length, for ``DataLoader(batch_sampler=...)``.

    Args:
        lengths: token count per sample (:func:`medtune.data.packing.token_lengths`).
        batch_size: samples per batch per rank.
        world_size: number of ranks.
        rank: this rank.
        seed: base seed; the order depends on (seed, epoch).
        megabatch_mult: megabatches hold ``batch_size * world_size * megabatch_mult`` samples (1 is
            LLaVA's choice; larger groups lengths more tightly, at the cost of less mixing).
        shuffle: False keeps index order (no grouping), e.g. for validation.
        drop_last: drop the last step when it has fewer than ``world_size`` batches, instead of
            completing it with batches from the start.

    Attributes:
        skip: batches of this rank to skip at the start of the next iteration (resume):
            ``sampler.set_epoch(epoch, skip=batches_done)``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        megabatch_mult: int = 8,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if batch_size < 1 or world_size < 1 or megabatch_mult < 1:
            raise ValueError("batch_size, world_size and megabatch_mult must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not lengths:
            raise ValueError("LengthGroupedBatchSampler needs at least one sample")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of ``epoch``; the first ``skip`` batches of this rank (already trained on) are
        left out (as :class:`medtune.training.data.ResumableSampler`, but counted in batches)."""
        self.epoch = epoch
        self.skip = skip

    def steps(self) -> list[list[list[int]]]:
        """All ranks' batches of this epoch: steps, each a list of ``world_size`` batches."""
        n, bs, ws = len(self.lengths), self.batch_size, self.world_size
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        mega = bs * ws * self.megabatch_mult
        batches: list[list[int]] = []
        for m in range(0, n, mega):
            group = perm[m : m + mega]
            if self.shuffle:  # longest first within the megabatch; stable, so ties keep perm order
                group = sorted(group, key=lambda i: -self.lengths[i])
            batches += [group[k : k + bs] for k in range(0, len(group), bs)]
        steps = [batches[k : k + ws] for k in range(0, len(batches), ws)]
        if self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        # a short step (only the last megabatch's leftovers can make one) goes last, then is
        # dropped or completed so that every rank runs the same number of batches
        short = [s for s in steps if len(s) < ws]
        steps = [s for s in steps if len(s) == ws]
        if short and not self.drop_last:
            filler = itertools.cycle([b for s in steps for b in s] or short[0])
            steps.append(short[0] + [next(filler) for _ in range(ws - len(short[0]))])
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps()[self.skip :]:
            yield step[self.rank]

    def __len__(self) -> int:
        # megabatches split into full batches except the last one's remainder
        mega = self.batch_size * self.world_size * self.megabatch_mult
        n_full, rest = divmod(len(self.lengths), mega)
        n_batches = n_full * self.world_size * self.megabatch_mult + -(-rest // self.batch_size)
        full, part = divmod(n_batches, self.world_size)
        steps = full + (1 if part and not self.drop_last else 0)
        return max(0, steps - self.skip)
