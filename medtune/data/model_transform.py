"""The model transform: one sample -> token ids, loss labels and image tensors for MedVLM.

Separate from any dataset, as torchtune's ``Llama3VisionTransform`` is: training wraps it in
:class:`VisionChatDataset`; eval, generate, the demo and the local judge call it on single samples
with ``inference=True`` (the ids then end with an open assistant header). Per sample it

1. optionally rewrites the first user turn with a prompt template (a list of templates is sampled
   per (seed, epoch, index), so runs are reproducible and resumable) and prepends a system turn;
2. splits every turn at the ``<image>`` markers (or puts all images at the start of the first user
   turn when there is no marker) and encodes the tokenizer's chat format as ids, each image becoming
   ``tokens_per_image`` copies of the placeholder id;
3. loads each image (PNG/JPEG/DICOM via :func:`medtune.data.images.load_image`) and applies every
   encoder's transform (with augmentation when ``train=True`` and ``augment`` is set).

All randomness (template sampling and augmentation) comes from generators seeded by
``(seed, epoch, index)``, never from the global RNGs: an item is the same whichever DataLoader
worker builds it and whether or not the run was resumed. Loss targets are the assistant turns
(content + ``<|eot_id|>``) only.
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
from medtune.data.sample import IMAGE_MARKER, Message, Sample, require_answers

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "MedVLMTransform",
    "VisionChatDataset",
    "item_seed",
    "medvlm_transform",
    "split_markers",
]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's generators: a function of ``(seed, epoch, index)`` only.

    Python's hash of a tuple of ints is not randomised per process (only str/bytes hashes are), so
    every process and every DataLoader worker gets the same value.
    """
    return hash((int(seed), int(epoch), int(index))) & 0xFFFFFFFF


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


class MedVLMTransform:
    """Sample -> model inputs (token ids, labels, image tensors), for training and inference.

    Args:
        tokenizer: any LLM family's tokenizer (:mod:`medtune.models.llm`); its chat format
            encodes the turns (:func:`medtune.models.llm.encode_messages`).
        image_token_id: the placeholder id (``model.image_token_id``).
        tokens_per_image: placeholders per image (``model.tokens_per_image``; 0 for a bare LLM).
        image_transforms: encoder name -> transform settings (``model.image_transforms``).
        prompt_template: None (keep the user text), a template string with ``{question}``, or a
            list of templates sampled per item (train-time instruction sampling).
        system_prompt: optional system turn prepended to every sample.
        max_seq_len: raise when a sample is longer (never silently cut an image or answer).
        window: optional DICOM window ``(center, width)`` or a named window, for every DICOM image.
        blank_images: replace every image with a constant (mean-grey) one: the question-only baseline.
        augment: augmentation overrides for :func:`medtune.data.images.image_transform`, applied
            when called with ``train=True``; None: no augmentation.
        seed: seed of template sampling and augmentation (with epoch and index).

    Calling it returns a dict: ``tokens`` (list[int]), ``labels`` (list[int], -100 where not a
    target), ``images`` (encoder name -> float tensor [n_img, 3, H, W]), ``n_images`` (int), ``id``.
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_token_id: int,
        tokens_per_image: int,
        image_transforms: dict[str, dict],
        prompt_template: str | list[str] | None = None,
        system_prompt: str | None = None,
        max_seq_len: int | None = None,
        window: Any = None,
        blank_images: bool = False,
        augment: dict | None = None,
        seed: int = 0,
    ):
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.tokens_per_image = int(tokens_per_image)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.max_seq_len = max_seq_len
        self.window = window
        self.blank_images = blank_images
        self.augment = augment
        self.seed = int(seed)
        self.eval_transforms = {
            name: image_transform(**cfg, train=False) for name, cfg in image_transforms.items()
        }
        self.train_transforms = (
            {
                name: image_transform(**cfg, train=True, augment=augment)
                for name, cfg in image_transforms.items()
            }
            if augment is not None
            else self.eval_transforms
        )

    # ------------------------------------------------------------------------------ pieces

    def prepare(self, sample: Sample, *, epoch: int = 0, index: int = 0) -> Sample:
        """Apply the prompt template (sampled per (seed, epoch, index)) and the system prompt."""
        from medtune.data.prompts import apply_template

        if self.prompt_template is not None:
            rng = random.Random(item_seed(self.seed, epoch, index))
            sample = apply_template(
                sample,
                self.prompt_template,
                rng if isinstance(self.prompt_template, list) else None,
            )
        if self.system_prompt:
            sample = Sample(
                sample.id,
                sample.images,
                [Message("system", self.system_prompt), *sample.messages],
                sample.meta,
            )
        return sample

    def encode(self, sample: Sample, *, inference: bool = False) -> tuple[list[int], list[int]]:
        """A prepared sample -> ``(ids, labels)``.

        With ``inference`` the last assistant turn (if any) is left out and the ids end with an
        open assistant header (for generation).

        Raises:
            DataError: placeholders that do not match the images, or longer than ``max_seq_len``.
        """
        from medtune.models.llm import encode_messages

        turns = split_markers(sample)
        if inference and turns and turns[-1][0] == "assistant":
            turns = turns[:-1]
        placeholder = [self.image_token_id] * self.tokens_per_image
        msgs = []
        for role, parts in turns:
            flat: list[str | int] = []
            for p in parts:
                flat += placeholder if p is None else [p]
            msgs.append((role, flat))
        ids, mask = encode_messages(self.tokenizer, msgs, add_generation_prompt=inference)
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

    def _pil(self, sample: Sample) -> list[Image.Image | None]:
        pil: list[Image.Image | None] = []
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
        return pil

    def load_images(
        self, sample: Sample, *, train: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Load and transform a sample's images for every encoder: name -> [n_img, 3, H, W].

        Args:
            sample: the sample.
            train: augment (when the transform was built with ``augment``).
            generator: the RNG augmentation draws from (see :meth:`__call__`).
        """
        pil = self._pil(sample)
        transforms = self.train_transforms if train else self.eval_transforms
        out = {}
        for name, tf in transforms.items():
            if not pil:
                out[name] = torch.zeros(0, 3, *tf.size)
            elif self.blank_images:
                out[name] = torch.zeros(len(pil), 3, *tf.size)  # normalized zero = the mean colour
            elif tf.train:
                out[name] = torch.stack([tf(im, generator=generator) for im in pil])
            else:
                out[name] = torch.stack([tf(im) for im in pil])
        return out

    def __call__(
        self,
        sample: Sample,
        *,
        inference: bool = False,
        train: bool = False,
        epoch: int = 0,
        index: int = 0,
    ) -> dict[str, Any]:
        """Encode one sample.

        Args:
            sample: any reader's sample.
            inference: drop the last assistant turn and end with an open assistant header.
            train: augment images (when ``augment`` was given).
            epoch, index: with ``seed``, what template sampling and augmentation draw from.

        Returns:
            ``tokens``, ``labels``, ``images``, ``n_images``, ``id`` (see the class docstring).
        """
        sample = self.prepare(sample, epoch=epoch, index=index)
        ids, labels = self.encode(sample, inference=inference)
        generator = None
        if train and self.augment is not None:
            generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        return {
            "tokens": ids,
            "labels": labels,
            "images": self.load_images(sample, train=train, generator=generator),
            "n_images": len(sample.images),
            "id": sample.id,
        }


def medvlm_transform(model, tokenizer, **kwargs: Any) -> MedVLMTransform:
    """The transform that fits ``model``: placeholder id, tokens per image and image transforms.

    Duck-typed: a MedVLM has ``encoders``, ``image_token_id``, ``tokens_per_image`` and
    ``image_transforms``; a bare Llama-3 decoder (no ``encoders``) gets ``tokens_per_image=0``, no
    image transforms, and the reserved placeholder id of the tokenizer.

    Args:
        model: a MedVLM or a torchtune decoder.
        tokenizer: its tokenizer.
        **kwargs: the other :class:`MedVLMTransform` arguments.
    """
    if hasattr(model, "encoders"):
        return MedVLMTransform(
            tokenizer,
            image_token_id=model.image_token_id,
            tokens_per_image=model.tokens_per_image,
            image_transforms=model.image_transforms,
            **kwargs,
        )
    from medtune.models.llm import image_token_id

    return MedVLMTransform(
        tokenizer,
        image_token_id=image_token_id(tokenizer),
        tokens_per_image=0,
        image_transforms={},
        **kwargs,
    )


class VisionChatDataset(torch.utils.data.Dataset):
    """A list of samples seen through a :class:`MedVLMTransform` (training and validation).

    Args:
        samples: the samples (any reader's output).
        transform: the model transform.
        train: augment images (when the transform has ``augment``).

    Item ``i`` is ``transform(samples[i], train=train, epoch=epoch, index=i)``.

    Raises:
        NoAnswerError: a sample has no assistant turn (nothing to learn from, no validation loss).
    """

    def __init__(self, samples: list[Sample], transform: MedVLMTransform, *, train: bool = False):
        self.samples = list(samples)
        require_answers(self.samples)  # answers are the targets: refuse prompts-only data early
        self.transform = transform
        self.train = train
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Template sampling and augmentation depend on (seed, epoch, index)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.samples[index], train=self.train, epoch=self.epoch, index=index)
