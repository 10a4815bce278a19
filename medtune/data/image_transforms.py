"""The encoder's image transform: resize, optional training augmentation, normalization.

:func:`image_transform` builds an :class:`ImageTransform`: resize (``squash`` / ``crop`` / ``pad``),
optional training augmentation (off unless ``train=True``; never a horizontal flip unless asked,
because left and right matter in medical images), scaling to [0, 1] and mean/std normalization.
Augmentation draws only from the ``torch.Generator`` passed per call (the model transform seeds
one per item, from (seed, epoch, index)), so an item does not depend on the global RNG, the
DataLoader worker or a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_AUGMENT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTransform",
    "image_transform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default augmentation for ``train=True``; keys of ``augment`` override these. Set one to 0 /
#: None / False to turn it off.
DEFAULT_AUGMENT: dict[str, Any] = {
    "crop_scale": (0.9, 1.0),  # random resized crop: area fraction kept
    "crop_ratio": (0.95, 1.05),  # and aspect-ratio range
    "rotation": 5.0,  # degrees, uniform in [-r, r]
    "brightness": 0.1,  # factor in [1 - b, 1 + b]
    "contrast": 0.1,  # factor in [1 - c, 1 + c]
    "hflip": 0.0,  # probability of a horizontal flip: off (left/right matters)
}

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_RESIZE_MODES = ("squash", "crop", "pad")


class ImageTransform:
    """PIL RGB image -> normalized ``float32`` tensor ``[3, H, W]``. Built by :func:`image_transform`.

    A class (not a closure) so that it pickles into DataLoader workers. Randomness (``train=True``)
    draws from the ``generator`` passed per call (the model transform seeds one per item), else
    from torch's global generator.

    Attributes:
        size: ``(H, W)`` of the output.
        mean, std: per-channel normalization.
        train: whether augmentation is applied.
        augment: the effective augmentation settings (``DEFAULT_AUGMENT`` merged with overrides).
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        augment: dict[str, Any],
        interpolation: str,
        resize_mode: str,
    ) -> None:
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = train
        self.augment = augment
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self._resample = _INTERP[interpolation]
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        self._lut = np.stack(
            [(levels - np.float32(m)) / np.float32(sd) for m, sd in zip(self.mean, self.std)]
        )

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, resize_mode={self.resize_mode!r}, "
            f"interpolation={self.interpolation!r}, train={self.train}, augment={self.augment})"
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """Deterministic geometry: ``squash`` (ignore aspect), ``crop`` (shorter side, center
        crop, as CLIP) or ``pad`` (longer side, pad with the mean colour, as LLaVA)."""
        h, w = self.size
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.resize_mode == "squash":
            return image.resize((w, h), self._resample)
        iw, ih = image.size
        if self.resize_mode == "crop":
            scale = max(w / iw, h / ih)
            nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
            image = image.resize((nw, nh), self._resample)
            left, top = (nw - w) // 2, (nh - h) // 2
            return image.crop((left, top, left + w, top + h))
        scale = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
        image = image.resize((nw, nh), self._resample)
        fill = tuple(int(round(m * 255)) for m in self.mean)
        canvas = Image.new("RGB", (w, h), fill)
        canvas.paste(image, ((w - nw) // 2, (h - nh) // 2))
        return canvas

    def __call__(self, image: Image.Image, generator=None):
        """Args: image: PIL image (any mode); generator: the ``torch.Generator`` augmentation
        draws from (None: torch's global one). Returns: ``float32`` tensor ``[3, H, W]``."""
        import torch

        image = self.resize(image)
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        if not self.train:
            # Normalization as a per-channel lookup table: one gather, no float temporaries.
            out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
            for c in range(3):
                np.take(self._lut[c], pixels[..., c], out=out[c])
            return torch.from_numpy(out)
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
            .to(torch.float32)
            .div_(255.0)
        )
        x = self._augment(x, generator)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def _augment(self, x, generator=None):
        """Random crop / rotation / brightness-contrast on ``x`` ``[3, H, W]`` in [0, 1], drawn
        from ``generator`` (so an item does not depend on the global RNG or the worker)."""
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        a = self.augment
        interp = {
            "nearest": InterpolationMode.NEAREST,
            "bilinear": InterpolationMode.BILINEAR,
        }.get(self.interpolation, InterpolationMode.BICUBIC)
        if a.get("crop_scale"):
            scale = tuple(a["crop_scale"])
            ratio = tuple(a.get("crop_ratio") or (1.0, 1.0))
            i, j, h, w = _crop_params(x, scale, ratio, generator)
            x = F.resized_crop(x, i, j, h, w, list(self.size), interpolation=interp, antialias=True)
        if a.get("rotation"):
            deg = float(a["rotation"])
            angle = float(torch.empty(1).uniform_(-deg, deg, generator=generator))
            x = F.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0, 0.0, 0.0])
        if a.get("brightness"):
            b = float(a["brightness"])
            x = F.adjust_brightness(
                x, float(torch.empty(1).uniform_(1 - b, 1 + b, generator=generator))
            )
        if a.get("contrast"):
            c = float(a["contrast"])
            x = F.adjust_contrast(
                x, float(torch.empty(1).uniform_(1 - c, 1 + c, generator=generator))
            )
        if a.get("hflip") and float(torch.rand(1, generator=generator)) < float(a["hflip"]):
            x = F.hflip(x)
        return x.clamp_(0.0, 1.0)


def _crop_params(x, scale, ratio, generator=None) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawing from ``generator``: ``(i, j, h, w)``."""
    import torch

    height, width = x.shape[-2:]
    area = height * width
    log_ratio = torch.log(torch.tensor([float(r) for r in ratio]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item()
        )
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator))
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator))
            return i, j, h, w
    in_ratio = width / height  # fall back to a central crop, as torchvision does
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_transform(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    train: bool = False,
    augment: dict[str, Any] | None = None,
    interpolation: str = "bicubic",
    resize_mode: str = "squash",
) -> Callable[[Image.Image], Any]:
    """Build the encoder's image transform.

    Args:
        image_size: output side, or ``(H, W)``.
        mean: per-channel mean (3 values), applied after scaling to [0, 1].
        std: per-channel std (3 values).
        train: apply random augmentation. Off by default; with ``train=False`` the transform is
            deterministic and ``augment`` is ignored (so one config block serves train and eval).
        augment: overrides of :data:`DEFAULT_AUGMENT` (``crop_scale``, ``crop_ratio``,
            ``rotation``, ``brightness``, ``contrast``, ``hflip``); a falsy value turns one off.
        interpolation: ``bicubic`` (default), ``bilinear``, ``nearest``, ``lanczos`` or ``box``.
        resize_mode: ``squash`` (resize to ``(H, W)`` ignoring aspect), ``crop`` (shorter side to
            size, center crop) or ``pad`` (longer side to size, pad with the mean colour).

    Returns:
        A picklable callable: PIL image -> ``float32`` tensor ``[3, H, W]``, normalized.

    Raises:
        ValueError: unknown interpolation, resize mode or augmentation key; bad mean/std length.
    """
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = (int(image_size[0]), int(image_size[1]))
    if min(size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    if interpolation not in _INTERP:
        raise ValueError(
            f"unknown interpolation {interpolation!r} (expected one of {sorted(_INTERP)})"
        )
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r} (expected one of {_RESIZE_MODES})")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    augment = dict(augment or {})
    unknown = set(augment) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(
            f"unknown augmentation key(s) {sorted(unknown)} (expected some of {sorted(DEFAULT_AUGMENT)})"
        )
    effective = {**DEFAULT_AUGMENT, **augment}
    return ImageTransform(
        size,
        mean,
        std,
        train=train,
        augment=effective,
        interpolation=interpolation,
        resize_mode=resize_mode,
    )
