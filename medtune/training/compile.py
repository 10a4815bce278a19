"""``compile: true``: per-layer ``torch.compile`` of the decoder (and trained encoders), as torchtune.

torchtune's ``training.compile_model`` compiles each ``TransformerSelfAttentionLayer`` in place
(``module.compile()``) rather than the whole model: identical layers share one compiled graph, so
compile time does not grow with depth, and the code between layers (MedVLM's placeholder scatter,
the answer-position selection of :func:`~medtune.models.medvlm.output_at`, hooks of FSDP and LoRA)
stays eager. medtune does the same for the decoder and, when an encoder trains, for that encoder's
transformer blocks (timm's ``blocks``, open_clip's ``resblocks``, ...). A frozen encoder runs once
forward per image with no backward, where compiling pays little.

The backend is ``TORCH_COMPILE_BACKEND`` (default ``inductor``), as in torchtune.
"""

from __future__ import annotations

import os

from torch import nn
from torchtune.modules import TransformerCrossAttentionLayer, TransformerSelfAttentionLayer


def block_list(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a vision tower: the children of its first (breadth-first)
    ``ModuleList`` / ``Sequential`` whose children are all of one class with submodules.

    Returns:
        the blocks, or an empty list when the module holds no such container.
    """
    queue = [module]
    while queue:
        m = queue.pop(0)
        kids = list(m.children())
        if (
            isinstance(m, (nn.ModuleList, nn.Sequential))
            and kids
            and len({type(k) for k in kids}) == 1
            and any(True for _ in kids[0].children())
        ):
            return kids
        queue += kids
    return []


def compile_model(
    model: nn.Module,
    decoder: nn.Module | None = None,
    *,
    backend: str | None = None,
    encoders: bool | None = None,
    verbose: bool = True,
) -> list[str]:
    """Compile, in place, every decoder layer and the blocks of the trained encoders.

    Call after LoRA/FSDP wrapping and after ``requires_grad`` is set (torchtune's order: compile,
    then shard; medtune's recipes set the trainable parts first so that ``encoders=None`` sees
    which encoders train).

    Args:
        model: a MedVLM (or a bare decoder).
        decoder: the torchtune decoder inside ``model`` (default ``model.decoder``, or ``model``).
        backend: ``torch.compile`` backend (default ``$TORCH_COMPILE_BACKEND`` or ``"inductor"``).
        encoders: compile encoder blocks: True (all), False (none), None (those with a trainable
            parameter).
        verbose: print one line with what was compiled.

    Returns:
        the names (in ``model``) of the compiled modules.
    """
    backend = backend or os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    if decoder is None:
        decoder = getattr(model, "decoder", model)
    names = {id(m): n for n, m in model.named_modules()}
    done: list[str] = []
    for m in reversed(list(decoder.modules())):  # torchtune's order
        if isinstance(m, (TransformerSelfAttentionLayer, TransformerCrossAttentionLayer)):
            m.compile(backend=backend)
            done.append(names.get(id(m), type(m).__name__))
    n_dec = len(done)
    for name, enc in getattr(model, "encoders", {}).items():
        trains = any(p.requires_grad for p in enc.parameters())
        if encoders is False or (encoders is None and not trains):
            continue
        for m in block_list(enc):
            m.compile(backend=backend)
            done.append(names.get(id(m), f"encoders.{name}"))
    if verbose:
        print(
            f"compile ({backend}): {n_dec} decoder layers, {len(done) - n_dec} encoder blocks",
            flush=True,
        )
    return done
