"""The item every image-classification reader returns (:mod:`medtune.data.classification`,
:mod:`medtune.data.kaggle_chest`). Import-light: standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LabeledImage"]


@dataclass
class LabeledImage:
    """One image with its multi-label ground truth.

    Attributes:
        id: unique within the dataset (image file name stem, patient id, ImageId).
        image: absolute path of the image file (PNG/JPEG or DICOM).
        labels: class -> 0 or 1; classes with an unknown label are absent.
        dataset: ``chestxray14``, ``chexpert``, ``rsna_pneumonia`` or ``siim_acr``.
        split: the split it was read from.
        meta: other fields of the source row (view, patient, ...).
    """

    id: str
    image: str
    labels: dict[str, int]
    dataset: str
    split: str
    meta: dict[str, Any] = field(default_factory=dict)
