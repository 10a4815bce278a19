"""Image-caption pairs as BLIP's recipes read them (salesforce/BLIP ``data/pretrain_dataset.py``,
``data/coco_karpathy_dataset.py``, ``data/utils.py::pre_caption``).

- :func:`pre_caption`: BLIP's caption cleaning (lower case, ``.!"()*#:;~`` to spaces, spaces
  collapsed, at most ``max_words`` words).
- :class:`BlipPairs`: samples (``caption_json``, ``subfigure_json``, ``roco``, ...) ->
  ``(index, image [3, H, W], caption, image_id)``; a subfigure is cropped from its figure; the
  image id numbers distinct (image, crop) pairs in order of appearance (BLIP's ``img_ids``: the
  retrieval ITC positives and the ``txt2img`` / ``img2txt`` of the evaluation).
- :class:`BlipCollate`: captions padded to ``max_length`` (BLIP pads to max length: 30 in
  pretraining, 35 in retrieval).
"""

from __future__ import annotations

import re

import torch


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's ``pre_caption``."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def image_key(sample) -> tuple:
    crop = sample.meta.get("crop") if isinstance(sample.meta, dict) else None
    return (str(sample.images[0]), tuple(crop) if crop else None)


class BlipPairs(torch.utils.data.Dataset):
    """Samples with one image -> ``(index, image, caption, image_id)``.

    Args:
        samples: reader output.
        transform: the encoder's image transform settings.
        max_words: :func:`pre_caption`'s cut (BLIP: 30).
        train, augment, seed: random augmentation (``medtune.data.images.image_transform``
            keys), seeded per ``(seed, epoch, index)`` so workers and resume do not change it.
    """

    def __init__(
        self,
        samples,
        transform: dict,
        *,
        max_words: int = 30,
        train: bool = False,
        augment: dict | None = None,
        seed: int = 0,
    ):
        from medtune.data.image_text import caption_of
        from medtune.data.images import image_transform
        from medtune.utils.errors import UserError

        self.samples = list(samples)
        ids: dict[tuple, int] = {}
        self.image_ids = []
        for s in self.samples:
            if len(s.images) != 1:
                raise UserError(f"sample {s.id}: {len(s.images)} images (BLIP pairs need one)")
            self.image_ids.append(ids.setdefault(image_key(s), len(ids)))
        self.n_images = len(ids)
        self.captions = [pre_caption(caption_of(s), max_words) for s in self.samples]
        self.augmenting = bool(train and augment)
        self.transform = image_transform(**transform, train=self.augmenting, augment=augment)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> torch.Tensor:
        from medtune.data.subfigures import load_crop

        image = load_crop(self.samples[i])
        if not self.augmenting:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.transform(image)

    def __getitem__(self, i: int):
        return i, self.image(i), self.captions[i], self.image_ids[i]

    def retrieval_index(self) -> tuple[list[int], list[int], list[list[int]]]:
        """(a sample index per distinct image, ``txt2img`` per caption, ``img2txt`` per image)."""
        first: dict[int, int] = {}
        img2txt: list[list[int]] = [[] for _ in range(self.n_images)]
        for j, img in enumerate(self.image_ids):
            first.setdefault(img, j)
            img2txt[img].append(j)
        return [first[k] for k in range(self.n_images)], list(self.image_ids), img2txt


class ImagesOf(torch.utils.data.Dataset):
    """One item per distinct image of a :class:`BlipPairs` (evaluation): the image tensor."""

    def __init__(self, pairs: BlipPairs, rows: list[int]):
        self.pairs, self.rows = pairs, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.pairs.image(self.rows[k])


class BlipCollate:
    """``[(index, image, caption, image_id)]`` -> ``{index, images, input_ids, attention_mask,
    image_id}`` with captions padded / cut to ``max_length`` (a class so it pickles)."""

    def __init__(self, tokenizer, max_length: int = 30):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch):
        index, images, texts, image_id = zip(*batch)
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "index": torch.tensor(index, dtype=torch.long),
            "images": torch.stack(images),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "image_id": torch.tensor(image_id, dtype=torch.long),
        }
