"""Length-grouped batching: less padding, every sample seen, same batch count per rank, resumable."""

from __future__ import annotations

import pytest
import torch

from medtune.data.sampling import LengthGroupedBatchSampler
from medtune.testing.packing import report_lengths

LENGTHS = [40 + x for x in report_lengths(203, seed=1)]  # 203: a ragged last megabatch


def _padded_tokens(batches, lengths) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_groups_similar_lengths_so_batches_pad_less():
    s = LengthGroupedBatchSampler(LENGTHS, 8, seed=0)
    grouped = list(s)
    perm = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [perm[k : k + 8] for k in range(0, len(perm), 8)]
    real = sum(LENGTHS)
    waste_grouped = _padded_tokens(grouped, LENGTHS) - real
    waste_plain = _padded_tokens(plain, LENGTHS) - real
    assert waste_grouped < 0.25 * waste_plain, (waste_grouped, waste_plain)
    assert sorted(i for b in grouped for i in b) == list(range(len(LENGTHS)))
    # the batch order is shuffled: lengths are not monotonic over the epoch
    firsts = [LENGTHS[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_deterministic_by_seed_and_epoch_and_resumable():
    s = LengthGroupedBatchSampler(LENGTHS, 8, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert list(s) == full
    s.set_epoch(2, skip=5)
    assert list(s) == full[5:] and len(s) == len(full) - 5
    s.set_epoch(3)
    assert list(s) != full
    assert list(LengthGroupedBatchSampler(LENGTHS, 8, seed=4)) != list(
        LengthGroupedBatchSampler(LENGTHS, 8, seed=3)
    )


@pytest.mark.parametrize("n", [1, 7, 64, 203])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_share_the_epoch_with_equal_batch_counts(n, world_size, drop_last):
    lengths = LENGTHS[:n]
    per_rank = [
        list(
            LengthGroupedBatchSampler(
                lengths, 4, world_size=world_size, rank=r, seed=1, drop_last=drop_last
            )
        )
        for r in range(world_size)
    ]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1
    for r in range(world_size):
        s = LengthGroupedBatchSampler(
            lengths, 4, world_size=world_size, rank=r, seed=1, drop_last=drop_last
        )
        assert len(s) == len(per_rank[r])
    seen = [i for batches in per_rank for b in batches for i in b]
    assert all(0 < len(b) <= 4 for batches in per_rank for b in batches)
    if drop_last:
        assert len(seen) == len(set(seen))  # nothing repeated
    else:
        assert set(seen) == set(range(n))  # nothing lost
    if n % (4 * world_size) == 0:
        assert sorted(seen) == list(range(n))  # exactly once when the epoch divides evenly


def test_no_shuffle_keeps_index_order():
    s = LengthGroupedBatchSampler(LENGTHS[:10], 4, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        LengthGroupedBatchSampler(LENGTHS, 4, world_size=2, rank=2)
