"""Zero-shot classification with MAVL: the present-probability of the entity each class maps to.

Followed: ``Zero-shot_classification/test.py`` of HieuPhan33/CVPR2024_MAVL, ``mode: feature``:
``softmax`` over the (absent, present) logits of each entity, the present column taken for the
dataset's classes through MAVL's per-dataset class lists (``chexray14_cls``, ``chexpert_cls``,
``rsna_cls``, ``siim_cls``, ``covid_cls``, ``padchest_*_class``); ``Fibrosis`` is MAVL's
``tail_abnorm_obs``, PadChest's ``pleural effusion`` its ``effusion``. ``mode: text`` (MAVL's
COVIDx and PadChest-unseen/rare configs) scores from the global concept similarities instead.
Images are resized to the model's input size and normalised with ImageNet mean/std, as MAVL's test
datasets do (a ViT image side: its tower's own mean/std). Scores go to
:func:`medtune.eval.classification_metrics.score_classification_rows` (AUROC; MAVL's max-F1 rule,
which picks the threshold on the test set, is reported as ``*_mavl``, beside validation-chosen F1).
"""

from __future__ import annotations

import torch

from medtune.utils.errors import ConfigError

RULE = "mavl_presence_softmax"
RULES = {"feature": RULE, "text": "mavl_text_softmax"}

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
    # test.py renames PadChest's "pleural effusion"; every other class is its own entity name
    "padchest": {"pleural effusion": "effusion"},
}  # fmt: skip


def _transform(model) -> tuple[int, dict]:
    """The model's input: its size, mean and std (ResNet: MAVL's ImageNet statistics; ViT: the
    tower's own), bilinear resize as MAVL's ``transforms.Resize``."""
    enc = model.image
    return enc.image_size, {"image_size": enc.image_size, "mean": enc.mean, "std": enc.std,
                            "interpolation": "bilinear"}  # fmt: skip


def entity_indices(model, items, classes: list[str], class_map: dict[str, str] | None) -> list[int]:
    """The model's entity row for each class (``class_map`` overrides the dataset's default map)."""
    dataset = items[0].dataset if items else ""
    mapping = {**DATASET_ENTITY_MAP.get(dataset, {}), **(class_map or {})}
    out = []
    for c in classes:
        ent = mapping.get(c, c if c in model.entities else c.lower())
        if ent not in model.entities:
            raise ConfigError(
                f"mavl.class_map: class {c!r} maps to {ent!r}, which is not an entity of the model "
                "(add it with model.extra_entities and the books, or map it in mavl.class_map)"
            )
        out.append(model.entities.index(ent))
    return out


@torch.no_grad()
def mavl_scores(model, items, classes: list[str], class_map: dict[str, str] | None = None, *,
                batch_size: int = 64, device="cpu", num_workers: int = 0,
                mode: str = "feature") -> torch.Tensor:  # fmt: skip
    """Returns float ``[n_images, n_classes]`` present-probabilities (CPU); ``mode`` is MAVL's
    (``feature``: the classifier; ``text``: the global concept similarities, see
    :meth:`medtune.models.mavl.MAVL.presence`)."""
    from medtune.eval.zero_shot import _Images

    idx = entity_indices(model, items, classes, class_map)
    _, tf = _transform(model)
    loader = torch.utils.data.DataLoader(
        _Images([str(it.image) for it in items], tf), batch_size=batch_size, num_workers=num_workers
    )
    out = [model.presence(x.to(device), mode)[:, idx].float().cpu() for x in loader]
    return torch.cat(out) if out else torch.zeros(0, len(classes))


def target_mask(item, height: int, width: int):
    """The item's target mask at ``(height, width)`` from ``meta["boxes"]`` (RSNA) or
    ``meta["rles"]`` (SIIM-ACR), drawn at the original image size and resized (nearest) as MAVL."""
    import numpy as np
    from PIL import Image

    from medtune.data.images import load_image
    from medtune.eval.grounding import boxes_to_mask, masks_from_rles

    w0, h0 = load_image(item.image).size
    if "boxes" in item.meta:
        m = boxes_to_mask(item.meta["boxes"], h0, w0)
    elif "rles" in item.meta:
        m = masks_from_rles(item.meta["rles"], h0, w0)
    else:
        raise ConfigError(f"mavl.grounding: item {item.id} has no boxes or run-length masks "
                          "(use medtune.data.mavl_splits.mavl_rsna / mavl_siim)")  # fmt: skip
    return (
        np.asarray(Image.fromarray(m * 255).resize((width, height), Image.Resampling.NEAREST)) > 0
    )


@torch.no_grad()
def mavl_grounding(model, items, cls: str, class_map: dict[str, str] | None, *, thresholds,
                   concepts=None, overlay_dir=None, max_overlays: int = 0, batch_size: int = 16,
                   device="cpu") -> dict:  # fmt: skip
    """Zero-shot grounding of class ``cls`` on the items labelled 1 (MAVL's rule, see
    :mod:`medtune.eval.grounding`). Returns :func:`~medtune.eval.grounding.score_grounding`'s dict
    plus ``entity``; writes up to ``max_overlays`` PNGs into ``overlay_dir``."""
    from pathlib import Path

    from medtune.data.images import load_image
    from medtune.eval import grounding as g
    from medtune.eval.zero_shot import _Images

    pos = [it for it in items if it.labels.get(cls) == 1]
    ent = entity_indices(model, items, [cls], class_map)[0]
    size, tf = _transform(model)
    loader = torch.utils.data.DataLoader(
        _Images([str(it.image) for it in pos], tf), batch_size=batch_size
    )
    concepts = tuple(concepts) if concepts is not None else g.MAVL_CONCEPTS
    maps = []
    for x in loader:
        out = model(x.to(device))
        maps += list(
            g.attention_map(
                out["attn"], ent, model.n_concepts, (size, size), concepts=concepts
            ).cpu()
        )
    masks = [torch.from_numpy(target_mask(it, size, size)) for it in pos]
    res = g.score_grounding(maps, masks, thresholds)
    res["entity"] = model.entities[ent]
    if overlay_dir and max_overlays:
        Path(overlay_dir).mkdir(parents=True, exist_ok=True)
        for it, h, m in list(zip(pos, maps, masks))[:max_overlays]:
            g.save_overlay(load_image(it.image), h, m.numpy(), Path(overlay_dir) / f"{it.id}.png")
    return res
