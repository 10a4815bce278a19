"""Batching for :class:`medtune.data.model_transform.VisionChatDataset` items."""

from __future__ import annotations

from typing import Any

import torch

from medtune.data.model_transform import IGNORE_INDEX


def collate_vision_chat(
    batch: list[dict[str, Any]],
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    padding_side: str = "right",
) -> dict[str, Any]:
    """Pad token ids and labels; concatenate images in sample order.

    Args:
        batch: dataset items.
        pad_id: padding token id.
        ignore_index: label for padding.
        padding_side: ``"right"`` for training, ``"left"`` for generation.

    Returns:
        ``tokens`` [b, s], ``labels`` [b, s], ``images`` (encoder name -> [n_img_total, 3, H, W]),
        ``image_counts`` [b], ``ids`` (list).
    """
    longest = max(len(x["tokens"]) for x in batch)
    tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), ignore_index, dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["tokens"])
        sl = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        tokens[i, sl] = torch.tensor(x["tokens"], dtype=torch.long)
        labels[i, sl] = torch.tensor(x["labels"], dtype=torch.long)
    images = {name: torch.cat([x["images"][name] for x in batch]) for name in batch[0]["images"]}
    return {
        "tokens": tokens,
        "labels": labels,
        "images": images,
        "image_counts": torch.tensor([x["n_images"] for x in batch], dtype=torch.long),
        "ids": [x["id"] for x in batch],
    }
