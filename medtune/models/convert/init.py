"""``init_from: {kind: ..., path: ...}``: start a model from another project's released weights.

============  ==============================================  ===================================
kind          file(s)                                          into
============  ==============================================  ===================================
minigpt4      XrayGPT / MiniGPT-4 ``.pth`` (``model`` dict);   a Q-Former MedVLM (connector and,
              ``qformer_path``: LAVIS BLIP-2 ``.pth``          when present, the EVA tower)
medcap        medcap's ``last.pt`` (``visual`` +               ``medvlm_medcap_llama3_8b``'s
              ``projector``)                                   encoder and connector
lavis_blip2   LAVIS ``blip2_pretrained.pth``                   ``qformer_pretrain``'s Q-Former
              (``vision_side: skip`` for another width)
hf_llava      a transformers LLaVA folder (``path``: the       the ViT tower and MLP connector
              folder; see :mod:`medtune.models.llava`)         (the LLM: ``LlavaLLMCheckpointer``)
============  ==============================================  ===================================
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from medtune.utils.errors import ConfigError

KINDS = ("minigpt4", "medcap", "lavis_blip2", "hf_llava")
_ALLOWED = {
    "minigpt4": {"kind", "path", "qformer_path", "encoder"},
    "medcap": {"kind", "path", "encoder"},
    "lavis_blip2": {"kind", "path", "vision_side"},
    "hf_llava": {"kind", "path", "encoder"},
}


def is_foreign(spec) -> bool:
    """True for an ``init_from`` mapping that names a ``kind``."""
    return isinstance(spec, Mapping) and "kind" in spec


def foreign_state_dict(
    model: torch.nn.Module, spec: Mapping, key: str = "init_from"
) -> dict[str, torch.Tensor]:
    """The tensors ``spec`` gives ``model``, in ``model``'s names (checked by the kind's map).

    Raises:
        ConfigError: an unknown kind or option, or no ``path``.
        KeyMapError: the file does not fit (names the keys).
    """
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    extra = set(spec) - _ALLOWED[kind]
    if extra:
        raise ConfigError(
            f"{key}: unknown option(s) {sorted(extra)} for kind {kind} "
            f"(allowed: {sorted(_ALLOWED[kind] - {'kind'})})"
        )
    if not spec.get("path"):
        raise ConfigError(f"{key}.path: the {kind} checkpoint file is required")
    if kind == "minigpt4":
        from medtune.models.convert.minigpt4 import read_minigpt4

        return read_minigpt4(
            model, spec["path"], spec.get("qformer_path"), spec.get("encoder", "image")
        )
    if kind == "hf_llava":
        from medtune.models.llava import read_hf_llava

        return read_hf_llava(model, spec["path"], spec.get("encoder", "image"))
    if kind == "medcap":
        from medtune.models.convert.medcap import read_medcap

        return read_medcap(model, spec["path"], spec.get("encoder", "image"))
    from medtune.models.convert import read_foreign_checkpoint
    from medtune.models.convert.lavis_blip2 import blip2_stage1_state_dict

    return blip2_stage1_state_dict(
        model,
        read_foreign_checkpoint(spec["path"]),
        source=str(spec["path"]),
        vision_side=spec.get("vision_side", "load"),
    )
