"""Samples -> token ids, loss labels and image tensors for MedVLM.

:class:`VisionChatDataset` wraps any list of :class:`~medtune.data.sample.Sample` (SLAKE, VQA-RAD,
captions, ShareGPT/LLaVA conversations, mixes). Per item it

1. optionally rewrites the first user turn with a prompt template (a list of templates is sampled
   per (epoch, index) from ``seed``, so runs are reproducible and resumable);
2. splits every turn at the ``<image>`` markers (or puts all images at the start of the first user
   turn when there is no marker) and encodes the Llama-3 chat format as ids, each image becoming
   ``tokens_per_image`` copies of the placeholder id;
3. loads each image (PNG/JPEG/DICOM via :func:`medtune.data.images.load_image`) and applies every
   encoder's transform.

Loss targets are the assistant turns (content + ``<|eot_id|>``) only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medtune.data.errors import DataError
from medtune.data.images import image_transform, load_image
from medtune.data.sample import IMAGE_MARKER, Sample

IGNORE_INDEX = -100


def split_markers(sample: Sample) -> list[tuple[str, list[str | None]]]:
    """Messages -> ``(role, parts)`` with ``None`` where an image goes.

    Raises:
        DataError: when the markers do not match the number of images.
    """
    n_markers = sum(m.content.count(IMAGE_MARKER) for m in sample.messages)
    n_img = len(sample.images)
    if n_markers and n_markers != n_img:
        raise DataError(
            f"sample {sample.id}: {n_markers} '{IMAGE_MARKER}' marker(s) but {n_img} image(s)",
            reason="image marker mismatch",
        )
    out: list[tuple[str, list[str | None]]] = []
    placed = bool(n_markers)
    for m in sample.messages:
        parts: list[str | None] = []
        if not placed and m.role == "user" and n_img:
            parts += [None] * n_img
            placed = True
        chunks = m.content.split(IMAGE_MARKER)
        for j, chunk in enumerate(chunks):
            if j:
                parts.append(None)
            parts.append(chunk)
        out.append((m.role, parts))
    if not placed and n_img:
        raise DataError(
            f"sample {sample.id}: has {n_img} image(s) but no user turn to hold them",
            reason="no user turn",
        )
    return out


class VisionChatDataset(torch.utils.data.Dataset):
    """Tokenizing dataset for MedVLM training and evaluation.

    Args:
        samples: the samples (any reader's output).
        tokenizer: a Llama-3 tokenizer (:func:`medtune.models.llama3.llama3_tokenizer`).
        image_token_id: the placeholder id (``model.image_token_id``).
        tokens_per_image: placeholders per image (``model.tokens_per_image``).
        transforms: encoder name -> transform settings (``model.image_transforms``).
        train: enable the transforms' opt-in augmentation (when ``augment`` is given).
        augment: augmentation overrides for :func:`medtune.data.images.image_transform`, or None.
        prompt_template: None (keep the user text), a template string with ``{question}``, or a
            list of templates sampled per item (train-time instruction sampling).
        system_prompt: optional system turn prepended to every sample.
        seed: seed for template sampling.
        max_seq_len: raise when a sample is longer (never silently cut an image or answer).
        blank_images: replace every image with a constant (mean-grey) one: the question-only baseline.
        window: optional DICOM window ``(center, width)`` or a named window, for every DICOM image.

    Each item is a dict: ``tokens`` (list[int]), ``labels`` (list[int], -100 where not a target),
    ``images`` (encoder name -> float tensor [n_img, 3, H, W]), ``n_images`` (int), ``id``.
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
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.transforms = {
            name: image_transform(**cfg, train=train and augment is not None, augment=augment)
            for name, cfg in transforms.items()
        }
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.seed = seed
        self.epoch = 0
        self.max_seq_len = max_seq_len
        self.blank_images = blank_images
        self.window = window

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Template sampling depends on (seed, epoch, index)."""
        self.epoch = epoch

    def prepare(self, sample: Sample, index: int) -> Sample:
        """Apply the prompt template (and system prompt) to a sample."""
        from medtune.data.prompts import apply_template

        if self.prompt_template is not None:
            rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
            sample = apply_template(
                sample,
                self.prompt_template,
                rng if isinstance(self.prompt_template, list) else None,
            )
        if self.system_prompt:
            from medtune.data.sample import Message

            sample = Sample(
                sample.id,
                sample.images,
                [Message("system", self.system_prompt), *sample.messages],
                sample.meta,
            )
        return sample

    def encode(
        self, sample: Sample, *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Sample -> (ids, labels). With ``add_generation_prompt`` the last assistant turn is left out
        and the ids end with an open assistant header (for generation)."""
        from medtune.models.llama3 import encode_messages

        turns = split_markers(sample)
        if add_generation_prompt and turns and turns[-1][0] == "assistant":
            turns = turns[:-1]
        placeholder = [self.image_token_id] * self.tokens_per_image
        msgs = []
        for role, parts in turns:
            flat: list[str | int] = []
            for p in parts:
                flat += placeholder if p is None else [p]
            msgs.append((role, flat))
        ids, mask = encode_messages(
            self.tokenizer, msgs, add_generation_prompt=add_generation_prompt
        )
        n_ph = sum(1 for t in ids if t == self.image_token_id)
        want = len(sample.images) * self.tokens_per_image
        if n_ph != want:
            raise DataError(
                f"sample {sample.id}: {n_ph} image placeholders for {len(sample.images)} image(s) "
                f"x {self.tokens_per_image} tokens = {want}",
                reason="image token mismatch",
            )
        if self.max_seq_len is not None and len(ids) > self.max_seq_len:
            raise DataError(
                f"sample {sample.id}: {len(ids)} tokens exceed max_seq_len={self.max_seq_len} "
                "(raise max_seq_len or shorten the sample)",
                reason="too long",
            )
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        return ids, labels

    def load_images(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Load and transform a sample's images for every encoder: name -> [n_img, 3, H, W]."""
        pil = []
        for ref in sample.images:
            if self.blank_images:
                pil.append(None)
            elif isinstance(ref, (str, Path)):
                try:
                    pil.append(
                        load_image(ref, window=self.window, modality=sample.meta.get("modality"))
                    )
                except DataError as e:
                    raise DataError(
                        f"sample {sample.id}: {e}", reason=getattr(e, "reason", "bad image")
                    ) from None
            elif isinstance(ref, Image.Image):
                pil.append(ref.convert("RGB"))
            else:
                arr = np.asarray(ref)
                pil.append(
                    Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, -1)).convert(
                        "RGB"
                    )
                )
        out = {}
        for name, tf in self.transforms.items():
            if not pil:
                size = tf.size
                out[name] = torch.zeros(0, 3, *size)
            elif self.blank_images:
                out[name] = torch.zeros(len(pil), 3, *tf.size)  # normalized zero = the mean colour
            else:
                out[name] = torch.stack([tf(im) for im in pil])
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.prepare(self.samples[index], index)
        ids, labels = self.encode(sample)
        return {
            "tokens": ids,
            "labels": labels,
            "images": self.load_images(sample),
            "n_images": len(sample.images),
            "id": sample.id,
        }
