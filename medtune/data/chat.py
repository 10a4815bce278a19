"""The old import path of the model transform and the training dataset (kept for callers).

New code uses :mod:`medtune.data.transform`: :class:`~medtune.data.transform.MedVLMTransform`
(sample -> tokens, labels, images) and ``VisionChatDataset(samples, transform, train=...)``.
:class:`VisionChatDataset` here takes the old keyword arguments and builds the transform itself.
"""

from __future__ import annotations

from typing import Any

from medtune.data import transform as _transform
from medtune.data.sample import Sample
from medtune.data.transform import IGNORE_INDEX, MedVLMTransform, split_markers

__all__ = ["IGNORE_INDEX", "MedVLMTransform", "VisionChatDataset", "split_markers"]


class VisionChatDataset(_transform.VisionChatDataset):
    """``VisionChatDataset(samples, tokenizer, image_token_id=..., tokens_per_image=...,
    transforms=..., ...)``: the old signature, over a :class:`MedVLMTransform`.

    Args are :class:`MedVLMTransform`'s (``transforms`` is its ``image_transforms``) plus
    ``train``; ``augment`` is used only when ``train`` is true, as before.
    """

    def __init__(
        self,
        samples: list[Sample],
        tokenizer,
        *,
        image_token_id: int,
        tokens_per_image: int,
        transforms: dict[str, dict],
        train: bool = False,
        augment: dict | None = None,
        prompt_template: str | list[str] | None = None,
        system_prompt: str | None = None,
        seed: int = 0,
        max_seq_len: int | None = None,
        blank_images: bool = False,
        window: Any = None,
    ):
        tf = MedVLMTransform(
            tokenizer,
            image_token_id=image_token_id,
            tokens_per_image=tokens_per_image,
            image_transforms=transforms,
            prompt_template=prompt_template,
            system_prompt=system_prompt,
            max_seq_len=max_seq_len,
            window=window,
            blank_images=blank_images,
            augment=augment if train else None,
            seed=seed,
        )
        super().__init__(samples, tf, train=train)
