"""MAVL fine-tuning pieces against the reference's formulas: DiceBCELoss, metric.dice, label fraction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtune.training.finetune_mavl import dice_bce_loss, label_fraction, mavl_dice
from medtune.utils.errors import ConfigError


def test_dice_bce_as_mavl_utils():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    p = torch.sigmoid(logits).view(-1)
    t = target.view(-1)
    want = F.binary_cross_entropy(p, t) + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(dice_bce_loss(logits, target), want)


def test_mavl_dice_by_hand():
    truth = torch.zeros(3, 2, 2)
    truth[0, 0, 0] = truth[0, 0, 1] = 1  # positive image, 2 pixels
    prob = torch.zeros(3, 2, 2)
    prob[0, 0, 0] = 0.9  # 1 of 2 found: dice 2*1/(1+2) = 2/3
    prob[2, 1, 1] = 0.7  # image 2 has no mask but a prediction: 0; image 1 empty/empty: 1
    d = mavl_dice(prob, truth)
    assert d["dice_pos"] == pytest.approx(2 / 3) and d["dice_neg"] == pytest.approx(0.5)
    assert d["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3) and (d["n_pos"], d["n_neg"]) == (1, 2)


def test_label_fraction_is_seeded_and_sized():
    items = list(range(200))
    one = label_fraction(items, 0.01, seed=0)
    assert len(one) == 2 and one == label_fraction(items, 0.01, seed=0) and one == sorted(one)
    assert label_fraction(items, 0.1, seed=1) != label_fraction(items, 0.1, seed=2)
    assert label_fraction(items, 1.0, seed=0) == items
    with pytest.raises(ConfigError, match="keeps none"):
        label_fraction(items[:10], 0.01, seed=0)
