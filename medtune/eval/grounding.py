"""Zero-shot grounding metrics for attention maps: pointing game, IoU and Dice; Kaggle SIIM-ACR
run-length masks and RSNA boxes as target masks; MAVL's attention-map rule.

Followed: ``Zero-shot_grounding/test.py`` of HieuPhan33/CVPR2024_MAVL (``score_cal`` and the loop
of ``main``), only images whose label is 1 are scored:

- **map**: the decoder's head-averaged cross-attention, mean over the last 4 layers, then over the
  concepts ``[0, 6, 7, 8]`` of the target entity (``mode: avg``), reshaped to the patch grid and
  upsampled to the image with bilinear interpolation (``align_corners=True``).
- **pointing game**: a hit when any pixel holding the map's maximum lies in the mask (ties: any of
  the tied maxima counts); an empty mask is a miss.
- **IoU / Dice** at threshold ``th`` on the raw map (``map > th``):
  ``inter / (|mask| + |pred| - inter)`` and ``2 inter / (|mask| + |pred|)``. When mask and prediction
  are both empty the value is undefined: NaN here, left out of the means (MAVL's mean would be NaN).
- MAVL sweeps ``th`` over ``arange(1e-4, 0.1, 1e-5)`` and reports the threshold of the best mean Dice
  **chosen on the test set**; :func:`score_grounding` reports every given threshold and names that
  choice ``*_best_test_threshold_mavl``.

Run-length masks (Kaggle SIIM-ACR ``train-rle.csv``, ``mask_functions.rle2mask(...).T``): pairs of
(offset from the end of the previous run, length) over the column-major flattened image; ``-1`` is
no mask; several rows of one image are united.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medtune.utils.errors import UserError

MAVL_CONCEPTS = (0, 6, 7, 8)
MAVL_THRESHOLDS = tuple(np.arange(0.0001, 0.1, 0.00001).tolist())


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle SIIM run-length string -> uint8 mask ``[height, width]`` (``"-1"`` -> all zeros)."""
    mask = np.zeros(height * width, dtype=np.uint8)
    rle = rle.strip()
    if rle == "-1" or not rle:
        return mask.reshape(height, width)
    try:
        vals = [int(v) for v in rle.split()]
    except ValueError:
        raise UserError(f"run-length mask: expected integers, got {rle[:40]!r}") from None
    if len(vals) % 2:
        raise UserError("run-length mask: odd number of values (expected offset/length pairs)")
    pos = 0
    for start, length in zip(vals[0::2], vals[1::2]):
        pos += start
        if pos + length > mask.size:
            raise UserError(
                f"run-length mask: run at {pos}+{length} beyond a {height}x{width} image"
            )
        mask[pos : pos + length] = 1
        pos += length
    return mask.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """Inverse of :func:`rle_decode` (``"-1"`` for an empty mask)."""
    flat = np.asarray(mask).T.reshape(-1).astype(bool)
    if not flat.any():
        return "-1"
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    out, prev = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - prev), int(e - s)]
        prev = e
    return " ".join(map(str, out))


def masks_from_rles(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Union of several run-length masks of one image."""
    out = np.zeros((height, width), dtype=np.uint8)
    for r in rles:
        out |= rle_decode(r, height, width)
    return out


def boxes_to_mask(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """RSNA boxes ``[x, y, w, h]`` (pixels) -> uint8 mask, filled as MAVL's dataset does
    (``seg_map[int(y):int(y)+int(h), int(x):int(x)+int(w)] = 1``)."""
    out = np.zeros((height, width), dtype=np.uint8)
    for x, y, w, h in boxes:
        out[int(y) : int(y) + int(h), int(x) : int(x) + int(w)] = 1
    return out


def pointing_hit(heatmap: torch.Tensor, mask: torch.Tensor) -> bool:
    """Any maximum of ``heatmap [H, W]`` inside ``mask [H, W]`` (ties: any counts)."""
    peak = heatmap == heatmap.max()
    return bool((peak & (mask > 0)).any())


def iou_dice(heatmap: torch.Tensor, mask: torch.Tensor, threshold: float) -> tuple[float, float]:
    """IoU and Dice of ``heatmap > threshold`` against ``mask`` (NaN, NaN when both are empty)."""
    pred, gt = heatmap > threshold, mask > 0
    inter = float((pred & gt).sum())
    sp, sg = float(pred.sum()), float(gt.sum())
    if sp + sg == 0:
        return math.nan, math.nan
    return inter / (sp + sg - inter), 2 * inter / (sp + sg)


def attention_map(
    attn: list[torch.Tensor],
    entity: int,
    n_concepts: int,
    image_hw: tuple[int, int],
    *,
    concepts: Sequence[int] = MAVL_CONCEPTS,
    last_layers: int = 4,
) -> torch.Tensor:
    """MAVL's grounding map of one entity.

    Args:
        attn: per decoder layer ``[B, E * K, P]`` (``MAVL.forward()["attn"]``).
        entity: the target entity row; n_concepts: K.
        image_hw: output size (the input image's).
        concepts: concepts averaged (MAVL: 0 = description, 6, 7, 8).
        last_layers: layers averaged from the end (MAVL: 4).

    Returns:
        float ``[B, H, W]``.
    """
    if any(c >= n_concepts for c in concepts):
        raise UserError(
            f"grounding concepts {list(concepts)}: the model has {n_concepts} per entity"
        )
    a = torch.stack(attn[-last_layers:]).mean(0)
    b, _, p = a.shape
    s = int(round(math.sqrt(p)))
    a = a.view(b, -1, n_concepts, p)[:, entity, list(concepts)].mean(1).view(b, 1, s, s)
    return F.interpolate(a.float(), image_hw, mode="bilinear", align_corners=True)[:, 0]


def score_grounding(
    heatmaps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], thresholds: Sequence[float]
) -> dict:
    """Pointing game and mean IoU / Dice per threshold over positive images.

    Args:
        heatmaps, masks: one ``[H, W]`` pair per positive image.
        thresholds: the values of ``th`` to report.

    Returns:
        ``{"n", "pointing_game", "iou": {th: mean}, "dice": {th: mean}, "best_test_threshold_mavl",
        "iou_best_test_threshold_mavl", "dice_best_test_threshold_mavl"}`` (means leave NaN out).
    """
    n = len(heatmaps)
    out: dict = {"n": n, "pointing_game": None, "iou": {}, "dice": {}}
    if not n:
        return out
    out["pointing_game"] = sum(pointing_hit(h, m) for h, m in zip(heatmaps, masks)) / n
    best = None
    for th in thresholds:
        vals = np.array([iou_dice(h, m, th) for h, m in zip(heatmaps, masks)], dtype=float)
        iou = float(np.nanmean(vals[:, 0])) if not np.isnan(vals[:, 0]).all() else math.nan
        dice = float(np.nanmean(vals[:, 1])) if not np.isnan(vals[:, 1]).all() else math.nan
        key = f"{th:g}"
        out["iou"][key], out["dice"][key] = iou, dice
        if not math.isnan(dice) and (best is None or dice > best[1]):
            best = (th, dice, iou)
    if best is not None:
        out["best_test_threshold_mavl"] = best[0]
        out["dice_best_test_threshold_mavl"], out["iou_best_test_threshold_mavl"] = best[1], best[2]
    return out


def save_overlay(image, heatmap: torch.Tensor, mask: np.ndarray | None, path) -> None:
    """PNG of ``image`` (PIL) with the heatmap in red and the target outline in green."""
    from PIL import Image

    rgb = np.asarray(image.convert("RGB").resize(heatmap.shape[::-1])).astype(np.float32)
    h = heatmap.float().numpy()
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    rgb[..., 0] = np.clip(rgb[..., 0] * (1 - 0.5 * h) + 255 * 0.5 * h, 0, 255)
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (0, 255, 0)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
