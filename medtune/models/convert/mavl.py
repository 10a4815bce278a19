"""Key map for the released MAVL checkpoints (HieuPhan33/CVPR2024_MAVL, ``checkpoint_full_46.pth``).

The file is ``torch.save({"model": state_dict, "optimizer": ..., ...})`` written under DDP /
accelerate, so names carry a ``module.`` prefix. Names follow ``Pretrain/models/model_MAVL.py``:

==============================  ==========================================
MAVL                            medtune (:class:`medtune.models.mavl.MAVL`)
==============================  ==========================================
``disease_embedding_layer.*``   ``query_proj.*``
``backbone.0.*`` (conv1)        ``image.trunk.conv1.*``
``backbone.1.*`` (bn1)          ``image.trunk.bn1.*``
``backbone.4/5/6.*``            ``image.trunk.layer1/2/3.*``
``pool.*``                      ``image.pool.*``
``res_l1.0.*`` / ``res_l1.1.*`` ``image.proj1.0.*`` / ``image.proj1.1.*``
``res_l2.*``                    ``image.proj2.*``
``decoder.*``, ``location_emb.*``, ``classifier.*``, ``temp``: same names
==============================  ==========================================

MAVL's zero-shot scripts drop ``temp`` before loading (only training uses it); a checkpoint without
it keeps the model's initial temperatures. Anything else left over (a ViT ``global_l``, a
``bottleneck``, MedKLIP's differently shaped heads) is refused by name: MedKLIP's
``checkpoint_final.pth`` has per-entity ``res_l1``/``res_l2`` linears and no concept book, so it
does not fit this model and is not mapped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from medtune.models.convert import (
    KeyMapError,
    apply_key_map,
    read_foreign_checkpoint,
    strip_prefix,
)

_BACKBONE = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
_PREFIXES = {
    "disease_embedding_layer.": "query_proj.",
    "pool.": "image.pool.",
    "res_l1.": "image.proj1.",
    "res_l2.": "image.proj2.",
    "decoder.": "decoder.",
    "location_emb.": "location_emb.",
    "classifier.": "classifier.",
}


def rename(key: str) -> str | None:
    """One MAVL name (without ``module.``) -> medtune's, or None if the map does not know it."""
    if key == "temp":
        return "temp"
    m = re.match(r"backbone\.(\d+)\.(.+)", key)
    if m:
        return f"image.trunk.{_BACKBONE[m[1]]}.{m[2]}" if m[1] in _BACKBONE else None
    for old, new in _PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def convert_mavl_state(
    state: dict[str, torch.Tensor], model, source: str = "MAVL checkpoint"
) -> dict:
    """MAVL state dict (``module.`` prefixes allowed) -> medtune names, checked against ``model``.

    Raises:
        KeyMapError: leftover, missing or mis-shaped keys, by name.
    """
    if not hasattr(model.image, "trunk"):
        raise KeyMapError(f"{source}: MAVL's released checkpoints are ResNet-50 models; this model "
                          "has a ViT image side (model.backbone: vit)")  # fmt: skip
    state = strip_prefix(state, "module.")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if "temp" not in state:
        expected.pop("temp", None)
    return apply_key_map(state, rename, expected, source=source)


def load_released_mavl(model, path: str | Path) -> None:
    """Load a released MAVL ``.pth`` into ``model`` (strict; temperatures kept if the file lacks them)."""
    sd = convert_mavl_state(read_foreign_checkpoint(path), model, source=f"MAVL {path}")
    model.load_state_dict(sd, strict="temp" in sd)
