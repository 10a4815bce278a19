"""BLIP-2 stage 1 around the recipe: caption batches, retrieval features, and stage 2's start.

- :class:`IndexedPairs` / :class:`CaptionCollate`: ``(index, image, caption)`` items -> a batch
  with BERT tokens padded to ``max_txt_len`` (LAVIS pads to max length; equal shapes on every rank
  also let the ITM negatives' tokens be gathered).
- :func:`stage1_state_dict`: MSMedCap's "train one Q-Former per encoder, then merge" as
  configuration. ``vision_finetune``'s ``init_from`` may be a mapping
  ``encoder name -> stage-1 checkpoint folder``; each folder's Q-Former (``ln_vision``,
  ``query_tokens``, the query path of ``qformer``) is copied into that encoder's ``blip2_qformer``
  connector (:mod:`medtune.models.blip2.connector`). The ITC/ITM/ITG heads and the text-only
  weights stay behind, as in LAVIS's stage 2. The connector's projection to the LLM is new. The
  tensors join the one full state dict the model loader fills the model from
  (:mod:`medtune.training.setup`), as ``vision_finetune`` does; nothing here loads a model.

Checkpoint layout of ``qformer_pretrain``: ``output_dir/epoch_{k}/model.safetensors`` (every
Q-Former tensor, :class:`~medtune.models.blip2.qformer.Blip2Qformer` names), ``qformer.json``
(its sizes), ``config.yaml``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medtune.training.checkpointing import MODEL_FILE
from medtune.utils.errors import ConfigError

SIZES_FILE = "qformer.json"


class IndexedPairs(torch.utils.data.Dataset):
    """``dataset[i]`` = ``(image, caption, ...)`` -> ``(i, image, caption)`` (the index keys the
    ITM draws)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]  # (image, caption[, index])
        return i, item[0], item[1]


class CaptionCollate:
    """``[(i, image [3, H, W], caption)]`` -> ``{index [b], images [b, 3, H, W], input_ids [b, T],
    attention_mask [b, T]}`` with ``T = max_txt_len`` (a class so it pickles into workers)."""

    def __init__(self, tokenizer, max_txt_len: int = 32):
        self.tokenizer, self.max_txt_len = tokenizer, max_txt_len

    def __call__(self, batch):
        index, images, texts = zip(*batch)
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_txt_len,
            return_tensors="pt",
        )
        return {
            "index": torch.tensor(index, dtype=torch.long),
            "images": torch.stack(images),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
        }


def save_sizes(model: nn.Module, folder: Path) -> None:
    """Write ``qformer.json``: what a stage-2 connector must match."""
    c = model.config
    sizes = {
        "vision_width": model.vision_width,
        "num_query_tokens": model.num_query_tokens,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "cross_attention_freq": c.cross_attention_frequency,
    }
    (folder / SIZES_FILE).write_text(json.dumps(sizes, indent=1) + "\n")


def _read_stage1(folder: str | Path, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = Path(folder) / MODEL_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{key}: {f} does not exist (expected a qformer_pretrain checkpoint folder such as "
            "outputs/qformer_pretrain_roco_sam/epoch_9)"
        )
    return load_file(str(f))


def stage1_state_dict(
    model: nn.Module, mapping: Mapping[str, str | Path], key: str = "init_from"
) -> dict[str, torch.Tensor]:
    """The MedVLM tensors that ``mapping``'s stage-1 checkpoints give, by MedVLM parameter name.

    Args:
        model: a MedVLM whose connector for each named encoder is a ``blip2_qformer`` connector.
        mapping: encoder name -> ``qformer_pretrain`` checkpoint folder (``epoch_k/``).
        key: the config key, for messages.

    Returns:
        ``{"connectors.<encoder>.<name>": tensor}`` for every connector tensor except ``proj.*``.

    Raises:
        ConfigError: an unknown encoder name, or a connector that is not a Blip2 Q-Former.
        FileNotFoundError / ValueError: a missing file, a checkpoint of other sizes (naming the
            folder and the first tensor that differs).
    """
    from medtune.models.blip2.connector import Blip2QFormerConnector

    out: dict[str, torch.Tensor] = {}
    for enc, folder in mapping.items():
        if enc not in model.connectors:
            raise ConfigError(
                f"{key}.{enc}: the model has no encoder '{enc}' (encoders: {', '.join(model.connectors)})"
            )
        conn = model.connectors[enc]
        if not isinstance(conn, Blip2QFormerConnector):
            raise ConfigError(
                f"{key}.{enc}: encoder '{enc}' has a {type(conn).__name__} connector; stage-1 "
                "checkpoints need connector 'blip2_qformer'"
            )
        sd = _read_stage1(folder, f"{key}.{enc}")
        shapes = {n: tuple(p.shape) for n, p in conn.named_parameters()}
        wanted = [n for n in shapes if not n.startswith("proj.")]
        missing = [n for n in wanted if n not in sd]
        if missing:
            raise ValueError(
                f"{key}.{enc}: {folder} lacks {len(missing)} Q-Former tensor(s), e.g. {missing[:3]} "
                "(not a qformer_pretrain checkpoint, or one with fewer layers?)"
            )
        for n in wanted:
            if tuple(sd[n].shape) != shapes[n]:
                raise ValueError(
                    f"{key}.{enc}: '{n}' is {tuple(sd[n].shape)} in {folder} but {shapes[n]} in the "
                    "connector (stage 1 and stage 2 differ in encoder width or Q-Former size)"
                )
            out[f"connectors.{enc}.{n}"] = sd[n]
    return out
