"""``medtune.models.hard_negatives.draw_negatives``: BLIP's / LAVIS's ``torch.multinomial`` draw
of one ITM negative per row, reproducible across ranks and batch orders."""

from __future__ import annotations

import pytest
import torch

from medtune.models.hard_negatives import draw_negatives
from medtune.utils.errors import UserError


def test_draws_follow_the_weights_and_never_pick_a_zero_weight():
    w = torch.tensor([[0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    draws = torch.stack([draw_negatives(w, torch.Generator().manual_seed(s)) for s in range(800)])
    assert (draws[:, 1] == 0).all()  # row 1's only admissible column
    assert not (draws == torch.arange(3)).any()
    assert (draws[:, 0] == 1).float().mean() == pytest.approx(0.75, abs=0.05)
    assert (draws[:, 2] == 0).float().mean() == pytest.approx(0.5, abs=0.06)


def test_a_sample_draws_the_same_negative_sample_in_any_batch_order():
    w = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)).fill_diagonal_(0)
    keys = torch.tensor([10, 4, 7, 1, 9, 2])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = draw_negatives(w, torch.Generator().manual_seed(5), keys)
    b = draw_negatives(w[perm][:, perm], torch.Generator().manual_seed(5), keys[perm])
    assert torch.equal(keys[perm][b], keys[a][perm])


def test_a_row_without_any_negative_is_refused_by_name():
    w = torch.ones(3, 3)
    w[2] = 0
    with pytest.raises(UserError, match="ITM: a sample has no negative in its global batch"):
        draw_negatives(w, torch.Generator().manual_seed(0))
