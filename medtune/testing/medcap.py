"""A medcap-layout vision checkpoint at tiny size, for tests and the medcap config's CLI run.

medcap's modified torchtune recipes save ``torch.save({'visual': model.visual.state_dict(),
'projector': model.projector.state_dict()}, 'meta_model_last.pt')`` (see
:mod:`medtune.models.convert.medcap`): ``visual`` is open_clip's visual tower under open_clip's
own names, ``projector`` an ``nn.Sequential(Linear(512, 4096), GELU(), Linear(4096, 4096 * 50))``.
:func:`write_medcap_checkpoint` writes the same structure from the tiny open_clip hub folder, with
a random projector sized for the tiny LLM (:func:`medtune.models.builders.tiny_medcap`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def write_medcap_checkpoint(
    clip_dir: str | Path,
    path: str | Path,
    llm_dim: int,
    num_tokens: int = 50,
    hidden_dim: int = 32,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write ``{'visual': ..., 'projector': ...}`` as medcap's ``last.pt`` (tiny).

    Args:
        clip_dir: an open_clip hub folder (``open_clip_pytorch_model.bin``): its ``visual.*``
            tensors become ``visual`` (open_clip names, without the ``visual.`` prefix).
        path: the file to write.
        llm_dim: the LLM width (the projector's output is ``num_tokens * llm_dim``).
        num_tokens: image tokens (medcap: 50).
        hidden_dim: the projector's hidden width (medcap: 4096).
        seed: seeds the projector's random init.

    Returns:
        ``(visual, projector)`` state dicts, as written.
    """
    sd = torch.load(Path(clip_dir) / "open_clip_pytorch_model.bin", weights_only=True)
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    width = visual["proj"].shape[1]  # open_clip's pooled embedding width (BiomedCLIP: 512)
    torch.manual_seed(seed)
    projector = nn.Sequential(
        nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, llm_dim * num_tokens)
    ).state_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"visual": visual, "projector": projector}, path)
    return visual, projector
