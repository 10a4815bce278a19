"""Image-caption pairs for contrastive pretraining (CLIP / BLIP-style towers).

- :func:`caption_of`: a sample's caption (``meta["caption"]``, else its last assistant turn);
- :class:`ImageTextDataset`: one-image samples -> ``(image [3, H, W], caption, index)``, augmentation
  seeded per ``(seed, epoch, index)``;
- :class:`collate_image_text`: a batch -> ``(images, tokens, ids)``.

Moved here from ``medtune/training/contrastive.py`` (which keeps the losses).
"""

from __future__ import annotations

import torch

from medtune.data.images import image_transform, load_image
from medtune.utils.errors import UserError


def caption_of(sample) -> str:
    """The caption of an image-caption sample: ``meta["caption"]``, else its last assistant turn."""
    text = sample.meta.get("caption") if isinstance(sample.meta, dict) else None
    if text is None:
        turns = [m.content for m in sample.messages if m.role == "assistant"]
        text = turns[-1] if turns else None
    if not isinstance(text, str) or not text.strip():
        raise UserError(
            f"sample {sample.id}: no caption (expected meta['caption'] or an assistant turn)"
        )
    return text


class ImageTextDataset(torch.utils.data.Dataset):
    """Samples with one image and a caption -> ``(image [3, H, W], caption str)``.

    Args:
        samples: reader output (``medtune.data.caption_json``, ``roco``, ...).
        transform: the model's image transform settings (``DualEncoder.transform``).
        train: apply ``augment`` (seeded per ``(seed, epoch, index)``: workers and resume do not
            change the draws, and the global RNGs are left alone).
    """

    def __init__(
        self,
        samples,
        transform: dict,
        *,
        train: bool = False,
        augment: dict | None = None,
        seed: int = 0,
    ):
        for s in samples:
            if len(s.images) != 1:
                raise UserError(
                    f"sample {s.id}: {len(s.images)} images (contrastive pairs need exactly one)"
                )
        self.samples = list(samples)
        self.augmenting = bool(train and augment)
        self.transform = image_transform(**transform, train=self.augmenting, augment=augment)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        image = load_image(s.images[0])
        if not self.augmenting:
            return self.transform(image), caption_of(s), i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.transform(image), caption_of(s), i


class collate_image_text:  # noqa: N801 - used like a function; a class so it pickles into workers
    """``[(image, caption, index)]`` -> ``(images [b, 3, H, W], tokens int64 [b, L], ids int64 [b])``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        images, texts, ids = zip(*batch)
        return (
            torch.stack(images),
            self.tokenizer(list(texts)),
            torch.tensor(ids, dtype=torch.int64),
        )
