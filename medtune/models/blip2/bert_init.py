"""A local HF BERT folder -> the BLIP-2 Q-Former (LAVIS's ``init_Qformer`` from bert-base-uncased).

BERT's embedding LayerNorm becomes ``qformer.layernorm``; each layer's self-attention and FFN load
into the Q-Former layer, the FFN also into the query FFN (``*_query``); cross-attention layers and
``[DEC]``'s embedding row keep their random init; ``token_type_embeddings`` and the pooler are
dropped (as LAVIS does); the MLM head's transform and bias go to ``lm_head`` / ``lm_bias`` when the
folder has them (bert-base-uncased does; PubMedBERT's ``BertModel`` folders do not).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

_LAYER = re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.(.*)$")


def _rename_bert(key: str) -> list[str]:
    """A BERT tensor name -> the Q-Former name(s) it initialises ([] when unused)."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )
    key = key.removeprefix("bert.")
    if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        return [key]
    if key.startswith("embeddings.LayerNorm."):
        return ["qformer.layernorm." + key.rsplit(".", 1)[1]]
    if key.startswith("cls.predictions.transform."):
        return ["lm_head." + key[len("cls.predictions.transform.") :]]
    if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        return ["lm_bias"]
    m = _LAYER.match(key)
    if not m:
        return []  # token_type_embeddings (LAVIS drops them), pooler, NSP head
    i, rest = m.groups()
    pre = f"qformer.encoder.layer.{i}."
    if rest.startswith("attention.self."):
        return [pre + "attention.attention." + rest[len("attention.self.") :]]
    if rest.startswith("attention.output."):
        return [pre + rest]
    if rest.startswith(("intermediate.", "output.")):  # text FFN, and the query FFN's start
        part, tail = rest.split(".", 1)
        return [pre + rest, f"{pre}{part}_query.{tail}"]
    return []


def load_bert_weights(model: nn.Module, bert_dir: str | Path) -> list[str]:
    """Copy a local HF BERT checkpoint into ``model`` (rows past BERT's vocabulary, i.e. ``[DEC]``,
    keep their random init). Returns the Q-Former names loaded."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a BERT folder without the MLM head is normal (PubMedBERT)
    hf_logging.disable_progress_bar()
    try:
        hf, info = BertForMaskedLM.from_pretrained(
            str(bert_dir), local_files_only=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    absent = set(info["missing_keys"])  # HF's random init for these: keep the Q-Former's own
    own = dict(model.named_parameters())
    loaded = []
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            if key in absent:
                continue
            for name in _rename_bert(key):
                if name not in own:
                    continue
                dst = own[name]
                if dst.shape[0] > value.shape[0] and dst.shape[1:] == value.shape[1:]:
                    dst[: value.shape[0]].copy_(value)  # the vocabulary grew by [DEC]
                elif dst.shape == value.shape:
                    dst.copy_(value)
                else:
                    raise ValueError(
                        f"{bert_dir}: '{key}' has shape {tuple(value.shape)}, the Q-Former's "
                        f"'{name}' is {tuple(dst.shape)}"
                    )
                loaded.append(name)
    return loaded


def bert_sizes(bert_dir: str | Path) -> tuple[dict, int, int]:
    f = Path(bert_dir) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"bert_dir: {f} does not exist (expected a HF BERT folder)")
    c = json.loads(f.read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    out = {k: c[k] for k in keys if k in c}
    out.update(
        vocab_size=c["vocab_size"] + 1,  # + [DEC]
        max_position_embeddings=c.get("max_position_embeddings", 512),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=c.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=c.get("attention_probs_dropout_prob", 0.1),
    )
    return out, c["vocab_size"], c.get("pad_token_id", 0)
