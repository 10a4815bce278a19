"""The one model loader of one process: build on ``meta`` -> load one full state dict -> check.

Every place that builds a model and fills it from a checkpoint goes through :func:`load_model`
(the training recipes on one process, ``generate`` / ``eval`` / ``serve`` / the demo through
:func:`medtune.training.loading.load_from_checkpoint`, ``serve``'s plain LLM, the local judge), as
open_clip's one factory (``open_clip/factory.py``: ``create_model`` builds, then
``load_checkpoint`` loads one state dict) and torchtune's ``_setup_model`` (build on meta, load one
full state dict, check) do. Sharded runs use the same steps with
:func:`medtune.training.setup.shard_vlm` + :func:`~medtune.training.setup.load_sharded` in between.

1. :func:`~medtune.training.setup.build_model`: the LLM decoder on ``meta`` (``everything_on_meta``:
   the whole model, for a bare LLM whose state dict holds every tensor, e.g. torchtune's own
   ``llama3_70b`` builder), encoders and connectors on the device with the weights their builders
   load;
2. optionally every ``nn.Linear`` of the decoder's layers becomes torchtune's ``FrozenNF4Linear``
   (``quantize="nf4"``, QLoRA's base format; the weights are quantized as they are copied in);
3. :func:`~medtune.training.setup.load_unsharded`: keys, shapes and width checked (one line naming
   ``source``), meta tensors allocated, the state dict copied in;
4. :func:`~medtune.training.setup.check_on_device`: nothing left on ``meta``.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medtune.training.setup import build_model, check_on_device, decoder_of, load_unsharded
from medtune.utils.errors import ConfigError

QUANTIZE = (None, "nf4")


def swap_nf4_linears(decoder: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` inside ``decoder.layers`` by a ``FrozenNF4Linear`` on ``device``.

    One linear at a time (its random init is at most one layer's weight in ``dtype``), so a 70B
    model never exists unquantized. Embeddings, norms and the output projection stay in ``dtype``.
    NF4 needs weight dimensions that are multiples of 256 (torchao's block size).

    Returns:
        How many linears were replaced.
    """
    from torchtune.modules.low_precision import FrozenNF4Linear

    n = 0
    for layer in decoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                nf4 = FrozenNF4Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=device,
                    dtype=dtype,
                )
                setattr(parent, name, nf4)
                n += 1
    return n


def load_model(
    model_cfg: Any,
    full: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    everything_on_meta: bool = False,
    quantize: str | None = None,
) -> nn.Module:
    """Build ``model_cfg`` on ``meta``, fill it from ``full`` and check that nothing is left out.

    Args:
        model_cfg: the ``model`` config node (a builder ``_component_``).
        full: one state dict in the model's key names (``decoder.*`` in a MedVLM); consumed.
        device: where the model ends up.
        dtype: the LLM's dtype.
        source: what ``full`` came from, for messages (``"checkpointer (<dir>)"``).
        everything_on_meta: build the whole model on ``meta`` (a bare LLM); else only the
            decoders made by medtune's builders (encoders load their own weights).
        quantize: None or ``"nf4"`` (one process only).

    Returns:
        The loaded model (train mode, as built).

    Raises:
        ConfigError: an unknown ``quantize``.
        UserError: ``full`` does not fit the model (other width, unknown, missing or mis-shaped
            keys), or a tensor was never loaded.
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize: expected null or nf4, got {quantize!r}")
    if not isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.create(dict(model_cfg))
    # a QLoRA model (``quantize_base``) is built on the device: torchao cannot quantize on meta
    # (as lora_finetune builds it); its NF4 weights then quantize in place while loading
    qlora = bool(model_cfg.get("quantize_base", False))
    build_on = torch.device("meta") if everything_on_meta and not qlora else device
    model = build_model(model_cfg, device=build_on, dtype=dtype, llm_on_meta=not qlora)
    if quantize == "nf4":
        swap_nf4_linears(decoder_of(model)[0], device, dtype)
    load_unsharded(model, full, device, source)
    check_on_device(model)
    return model
