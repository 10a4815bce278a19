"""Loading a ``blip_*`` checkpoint folder into :class:`medtune.models.blip.Blip` (resume, tools):
every key and shape checked with the checkpointing module's errors."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from medtune.models.blip.state import blip_shapes, copy_into


def load_blip_state(model: nn.Module, ckpt_dir: str | Path) -> list[str]:
    """Load a ``blip_*`` checkpoint folder (``model.safetensors``) into ``model``, every key and
    shape checked (:func:`medtune.training.checkpointing.check_trained` errors)."""
    from medtune.training.checkpointing import (
        MODEL_FILE,
        CheckpointMismatchError,
        check_trained,
        read_trained,
    )

    sd = read_trained(ckpt_dir)
    shapes, source = blip_shapes(model), str(Path(ckpt_dir) / MODEL_FILE)
    check_trained(sd, shapes, source, True)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise CheckpointMismatchError(
            f"{source}: {len(missing)} tensor(s) of the model are missing, e.g. {missing[:3]} "
            "(a blip_retrieval checkpoint has no text_decoder; start blip_pretrain from it with "
            "init_from, not resume)"
        )
    copy_into(model, sd)
    return list(sd)
