"""MIMIC-CXR with MedKLIP's preprocessed entity files, for MAVL pretraining.

Layout (``Pretrain/data_file/DATA_Prepare.md`` and ``Pretrain/dataset/dataset.py`` ``VL_Dataset``
of HieuPhan33/CVPR2024_MAVL, files from MedKLIP's release)::

    rad_graph_metric_{train,validate,test}.json   {image path: {"labels_id": int, ...}, ...}
    landmark_observation_adj_mtx.npy              int [N, 51, 75]: for report ``labels_id``, per
                                                  anatomy (51 rows) and entity (75 columns):
                                                  1 present there, 0 negated, -1 not mentioned

Image paths in the JSON are absolute paths on the authors' machine; the prefix ``path_prefix``
(theirs: ``/remote-home/share/medical/public/MIMIC-CXR-JPG/MIMIC-CXR/small``) is replaced by
``image_root``, as ``VL_Dataset.__getitem__`` does. A missing image is an error naming the JSON
file and key (MAVL silently trains on a random other image instead).

Per item, :func:`triplet_extraction` gives the entity labels (1 if any anatomy has 1, else 0 if any
has 0, else -1) and for each entity 8 anatomy indices: a present entity's true location (one drawn
among its positives) then 7 drawn among the other rows; an absent one 8 drawn among its non-positive
rows. The draws use a generator seeded by ``(seed, epoch, index)``, so workers, ranks and resumes
draw the same.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtune.data.errors import BadValueError, DataError, MalformedJSONError, MissingImageError
from medtune.data.rows import SkipCounter

MAVL_PATH_PREFIX = "/remote-home/share/medical/public/MIMIC-CXR-JPG/MIMIC-CXR/small"
N_ANATOMY, N_ENTITIES, N_CANDIDATES = 51, 75, 8


@dataclass
class EntityItem:
    """One image: ``image`` path and ``labels_id`` (row of the label matrix)."""

    id: str
    image: str
    labels_id: int


def mavl_entities(
    json_files: list[str],
    label_file: str,
    image_root: str,
    *,
    path_prefix: str = MAVL_PATH_PREFIX,
    skip_bad_rows: bool = False,
) -> dict:
    """Read MedKLIP's entity files.

    Args:
        json_files: the ``rad_graph_metric_*.json`` files to read (MAVL pretrains on all three).
        label_file: ``landmark_observation_adj_mtx.npy``.
        image_root: folder replacing ``path_prefix`` in the JSON paths.
        path_prefix: the authors' image root in the JSON keys.
        skip_bad_rows: count and drop bad rows instead of stopping at the first.

    Returns:
        ``{"items": [EntityItem], "labels": int8 ndarray [N, 51, 75]}``.
    """
    label_path = Path(label_file)
    if not label_path.is_file():
        raise DataError(f"{label_path}: label matrix not found", reason="missing file")
    try:
        labels = np.load(label_path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{label_path}: not a numpy array file ({e})") from None
    if labels.ndim != 3 or labels.shape[1:] != (N_ANATOMY, N_ENTITIES):
        raise DataError(f"{label_path}: shape {labels.shape}, expected [N, 51, 75]")
    counter = SkipCounter("mavl_entities", skip_bad_rows)
    items: list[EntityItem] = []
    for jf in json_files:
        path = Path(jf)
        if not path.is_file():
            raise DataError(f"{path}: entity file not found", reason="missing file")
        try:
            ann = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MalformedJSONError(
                f"not valid JSON ({e.msg} at line {e.lineno})", file=path
            ) from None
        if not isinstance(ann, dict):
            raise MalformedJSONError("expected an object {image path: {labels_id: int}}", file=path)
        for i, (key, row) in enumerate(ann.items()):
            try:
                lid = row.get("labels_id") if isinstance(row, dict) else None
                if not isinstance(lid, int) or not 0 <= lid < labels.shape[0]:
                    raise BadValueError(f"labels_id is {lid!r}, expected an int in [0, {labels.shape[0]})",
                                        file=path, row=i, row_id=key, id_name="image")  # fmt: skip
                img = Path(key.replace(path_prefix, str(image_root), 1)) if key.startswith(path_prefix) \
                    else Path(image_root) / key  # fmt: skip
                if not img.is_file():
                    raise MissingImageError(f"image {img} not found", file=path, row=i, row_id=key,
                                            id_name="image")  # fmt: skip
                items.append(EntityItem(id=key, image=str(img), labels_id=lid))
            except DataError as e:
                counter.record(e)
    return {"items": list(counter.finish(items)), "labels": labels.astype(np.int8)}


def triplet_extraction(
    class_label: np.ndarray, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """MAVL's ``VL_Dataset.triplet_extraction``.

    Args:
        class_label: int ``[51, 75]``.
        rng: the item's generator.

    Returns:
        ``(labels int64 [75] in {-1, 0, 1}, index int64 [75, 8])``.
    """
    n_anat, n_ent = class_label.shape
    labels = np.full(n_ent, -1, dtype=np.int64)
    index = np.zeros((n_ent, N_CANDIDATES), dtype=np.int64)
    for i in range(n_ent):
        col = class_label[:, i]
        if (col == 0).any():
            labels[i] = 0
        others = np.where(col != 1)[0].tolist()
        if (col == 1).any():
            labels[i] = 1
            if len(others) < N_CANDIDATES - 1:
                raise ValueError(f"entity {i}: fewer than 7 non-positive locations for negatives")
            row = [rng.choice(np.where(col == 1)[0].tolist())] + rng.sample(
                others, N_CANDIDATES - 1
            )
        else:
            row = rng.sample(others, N_CANDIDATES)
        index[i] = row
    return labels, index


class MAVLPretrainDataset(torch.utils.data.Dataset):
    """Items -> ``(image [3, H, W], labels int64 [75], index int64 [75, 8])``.

    Args:
        data: :func:`mavl_entities` output.
        transform: image transform settings (``image_size``, ``mean``, ``std``, ...).
        train: apply ``augment`` (MAVL: random resized crop at scale 0.2-1 and a horizontal flip;
            its RandAugment is not reproduced).
        seed: the run's seed (augmentation and location draws per ``(seed, epoch, index)``).
    """

    def __init__(self, data: dict, transform: dict, *, train: bool = False, augment: dict | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        from medtune.data.image_transforms import image_transform

        self.items, self.labels = data["items"], data["labels"]
        self.augmenting = bool(train and augment)
        self.transform = image_transform(**transform, train=self.augmenting, augment=augment)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from medtune.data.images import load_image

        it = self.items[i]
        key = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        try:
            labels, index = triplet_extraction(self.labels[it.labels_id], random.Random(key))
        except ValueError as e:
            raise BadValueError(
                f"labels_id {it.labels_id}: {e}", row_id=it.id, id_name="image"
            ) from None
        image = load_image(it.image)
        if self.augmenting:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                image = self.transform(image)
        else:
            image = self.transform(image)
        return image, torch.from_numpy(labels), torch.from_numpy(index)


def collate_mavl(batch):
    """``[(image, labels, index)]`` -> stacked ``(images, labels, index)``."""
    images, labels, index = zip(*batch)
    return torch.stack(images), torch.stack(labels), torch.stack(index)
