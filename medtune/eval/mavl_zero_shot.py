"""Zero-shot classification with MAVL: the present-probability of the entity each class maps to.

Followed: ``Zero-shot_classification/test.py`` of HieuPhan33/CVPR2024_MAVL, ``mode: feature``:
``softmax`` over the (absent, present) logits of each entity, the present column taken for the
dataset's classes through MAVL's per-dataset class lists (``chexray14_cls``, ``chexpert_cls``,
``rsna_cls``, ``siim_cls``); ``Fibrosis`` is MAVL's ``tail_abnorm_obs``. Images are resized to the
model's input size and normalised with ImageNet mean/std, as MAVL's test datasets do. Scores go
to :func:`medtune.eval.classification_metrics.score_classification_rows` (AUROC; MAVL's max-F1 rule,
which picks the threshold on the test set, is reported as ``*_mavl``, beside validation-chosen F1).
"""

from __future__ import annotations

import torch

from medtune.utils.errors import ConfigError

RULE = "mavl_presence_softmax"

# medtune reader class name -> MAVL entity, per reader ``dataset`` name.
DATASET_ENTITY_MAP: dict[str, dict[str, str]] = {
    "chestxray14": {
        "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "effusion",
        "Infiltration": "infiltrate", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
        "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "edema",
        "Emphysema": "emphysema", "Fibrosis": "tail_abnorm_obs", "Pleural_Thickening": "thicken",
        "Hernia": "hernia",
    },
    "chexpert": {
        "No Finding": "normal", "Enlarged Cardiomediastinum": "enlarge", "Cardiomegaly": "cardiomegaly",
        "Lung Opacity": "opacity", "Lung Lesion": "lesion", "Edema": "edema",
        "Consolidation": "consolidation", "Pneumonia": "pneumonia", "Atelectasis": "atelectasis",
        "Pneumothorax": "pneumothorax", "Pleural Effusion": "effusion", "Pleural Other": "abnormality",
        "Fracture": "fracture", "Support Devices": "device",
    },
    "rsna_pneumonia": {"Pneumonia": "pneumonia"},
    "siim_acr": {"Pneumothorax": "pneumothorax"},
    "covidx": {"COVID-19": "covid19"},
}  # fmt: skip


def entity_indices(model, items, classes: list[str], class_map: dict[str, str] | None) -> list[int]:
    """The model's entity row for each class (``class_map`` overrides the dataset's default map)."""
    dataset = items[0].dataset if items else ""
    mapping = {**DATASET_ENTITY_MAP.get(dataset, {}), **(class_map or {})}
    out = []
    for c in classes:
        ent = mapping.get(c, c.lower())
        if ent not in model.entities:
            raise ConfigError(
                f"mavl.class_map: class {c!r} maps to {ent!r}, which is not an entity of the model "
                "(add it with model.extra_entities and the books, or map it in mavl.class_map)"
            )
        out.append(model.entities.index(ent))
    return out


@torch.no_grad()
def mavl_scores(model, items, classes: list[str], class_map: dict[str, str] | None = None, *,
                batch_size: int = 64, device="cpu", num_workers: int = 0) -> torch.Tensor:  # fmt: skip
    """Returns float ``[n_images, n_classes]`` present-probabilities (CPU)."""
    from medtune.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD
    from medtune.eval.zero_shot import _Images

    idx = entity_indices(model, items, classes, class_map)
    size = model.image.grid * 16
    tf = {
        "image_size": size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
    }
    loader = torch.utils.data.DataLoader(
        _Images([str(it.image) for it in items], tf), batch_size=batch_size, num_workers=num_workers
    )
    out = [model.presence(x.to(device))[:, idx].float().cpu() for x in loader]
    return torch.cat(out) if out else torch.zeros(0, len(classes))
