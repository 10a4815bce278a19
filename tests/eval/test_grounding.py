"""Grounding metrics on hand-computed cases: box hit and miss, ties, empty mask, IoU/Dice values,
Kaggle run-length decoding (column-major, offsets from the previous run's end), MAVL's map rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medtune.eval.grounding import (
    attention_map,
    boxes_to_mask,
    iou_dice,
    masks_from_rles,
    pointing_hit,
    rle_decode,
    rle_encode,
    score_grounding,
)
from medtune.utils.errors import UserError


def test_rle_decode_is_column_major_with_relative_offsets():
    # 4x3 image (H=4, W=3); column-major positions: col 0 = 0..3, col 1 = 4..7, col 2 = 8..11.
    # "1 2 3 1": run at 1 of length 2 (rows 1,2 of col 0), then 3 after its end (pos 6: row 2 col 1)
    m = rle_decode("1 2 3 1", 4, 3)
    want = np.zeros((4, 3), np.uint8)
    want[1, 0] = want[2, 0] = want[2, 1] = 1
    assert np.array_equal(m, want)
    assert rle_encode(want) == "1 2 3 1"
    assert not rle_decode(" -1", 4, 3).any() and rle_encode(np.zeros((4, 3))) == "-1"
    both = masks_from_rles(["0 1", "11 1"], 4, 3)
    assert both[0, 0] == 1 and both[3, 2] == 1 and both.sum() == 2
    with pytest.raises(UserError, match="beyond a 4x3 image"):
        rle_decode("10 5", 4, 3)
    with pytest.raises(UserError, match="odd number"):
        rle_decode("1 2 3", 4, 3)


def test_boxes_fill_as_mavl():
    m = boxes_to_mask([[1.7, 0.2, 2.9, 2.0]], 4, 5)  # int(): x 1..2 (w 2), y 0..1 (h 2)
    want = np.zeros((4, 5), np.uint8)
    want[0:2, 1:3] = 1
    assert np.array_equal(m, want)


def test_pointing_game_hit_miss_ties_and_empty_mask():
    box = torch.from_numpy(boxes_to_mask([[0, 0, 2, 2]], 4, 4))
    hit = torch.zeros(4, 4)
    hit[1, 1] = 5.0
    miss = torch.zeros(4, 4)
    miss[3, 3] = 5.0
    tie = miss.clone()
    tie[0, 0] = 5.0  # one of two tied maxima inside the box
    assert pointing_hit(hit, box) and not pointing_hit(miss, box) and pointing_hit(tie, box)
    assert not pointing_hit(hit, torch.zeros(4, 4))  # empty mask: a miss
    s = score_grounding([hit, miss, tie], [box, box, box], [0.5])
    assert s["pointing_game"] == pytest.approx(2 / 3) and s["n"] == 3


def test_iou_dice_by_hand_and_empty_cases():
    mask = torch.zeros(4, 4)
    mask[0:2, 0:2] = 1  # 4 pixels
    heat = torch.zeros(4, 4)
    heat[0, 0:3] = 1.0  # 3 pixels above 0.5, 2 inside
    iou, dice = iou_dice(heat, mask, 0.5)
    assert iou == pytest.approx(2 / 5) and dice == pytest.approx(4 / 7)
    assert iou_dice(heat, mask, 1.0) == (0.0, 0.0)  # nothing above the threshold: no overlap
    assert iou_dice(heat, torch.zeros(4, 4), 0.5) == (0.0, 0.0)  # empty mask, something predicted
    both = iou_dice(torch.zeros(4, 4), torch.zeros(4, 4), 0.5)
    assert all(math.isnan(v) for v in both)  # both empty: undefined
    s = score_grounding([heat, torch.zeros(4, 4)], [mask, torch.zeros(4, 4)], [0.5, 1.0])
    assert s["dice"]["0.5"] == pytest.approx(4 / 7)  # the undefined pair is left out of the mean
    assert s["best_test_threshold_mavl"] == 0.5 and s[
        "iou_best_test_threshold_mavl"
    ] == pytest.approx(0.4)


def test_attention_map_averages_last_layers_and_mavl_concepts():
    b, e, k, s = 1, 2, 9, 2
    layers = []
    for v in (100.0, 1.0, 1.0, 1.0, 1.0):  # the first of 5 layers is left out
        a = torch.zeros(b, e * k, s * s)
        a[0, 1 * k + 0] = torch.tensor([v, 0, 0, 0])  # entity 1, concept 0: top-left
        a[0, 1 * k + 6] = torch.tensor([0, 0, 0, v])  # concept 6: bottom-right
        a[0, 1 * k + 3] = torch.tensor([0, 9, 0, 0])  # concept 3 is not one of MAVL's [0, 6, 7, 8]
        layers.append(a)
    m = attention_map(layers, 1, k, (2, 2))
    torch.testing.assert_close(m[0], torch.tensor([[0.25, 0.0], [0.0, 0.25]]))
    big = attention_map(layers, 1, k, (3, 3))  # align_corners=True keeps the corners
    assert big[0, 0, 0] == pytest.approx(0.25) and big[0, 1, 1] == pytest.approx(0.125)
    with pytest.raises(UserError, match="has 3 per entity"):
        attention_map(layers, 1, 3, (2, 2))
