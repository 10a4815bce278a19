"""BLIP's text side: a BERT with cross-attention in every layer, and a decoder sharing all of it
but the self-attention (salesforce/BLIP ``models/med.py`` + ``blip_pretrain.py``).

The layers are transformers' ``BlipTextModel`` / ``BlipTextLMHeadModel``, HF's port of BLIP's
``med.py`` (the same module tree and parameter names: ``embeddings.{word,position}_embeddings``,
``encoder.layer.N.{attention,crossattention,intermediate,output}``, ``cls.predictions.*``), the
same family of layers as the BLIP-2 Q-Former (:mod:`medtune.models.blip2.qformer`, built on
transformers' ``Blip2QFormerModel``); no second BERT is written here. Modes, as ``med.py``:

- text (ITC): ``text_encoder(ids, mask)``: no ``encoder_hidden_states``, cross-attention skipped;
- multimodal (ITM): ``text_encoder(ids, mask, encoder_hidden_states=image tokens)``, bidirectional;
- decoder (LM): ``text_decoder(ids, mask, encoder_hidden_states=...)``, causal self-attention.

Sharing (BLIP's ``tie_encoder_decoder_weights(text_decoder.bert, text_encoder, '', '/attention')``):
every weight whose module path does not contain ``/attention`` is tied: the embeddings, each
layer's cross-attention, intermediate and output blocks. The decoder keeps its own self-attention
(``attention.self`` and ``attention.output``, LayerNorm included). Here the modules themselves are
shared, which ties exactly the same weights. The LM head's decoder matrix is the word embedding.

Initialisation as BLIP: both towers from a local HF BERT folder (``BertModel.from_pretrained``
into encoder and decoder), cross-attention random, the vocabulary grown by ``[DEC]`` (bos) and
``[ENC]`` (BLIP's ``init_tokenizer``) with new rows random; ``token_type_embeddings`` and the
pooler are not part of ``med.py``'s model and are dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"

# bert-base sizes (BLIP's configs/bert_config.json / med_config.json) for builds without a folder
BERT_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=30522 + 2,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def blip_tokenizer(path: str):
    """BERT's tokenizer of ``path`` with BLIP's ``init_tokenizer`` additions: ``[DEC]`` as
    ``bos_token`` and ``[ENC]`` as an additional special token (ids right after the vocabulary).
    ``tok.enc_token_id`` is set as in BLIP."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer.path: {path} is not a folder (expected a HF BERT folder)"
        )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    tok.enc_token_id = tok.convert_tokens_to_ids(ENC_TOKEN)
    return tok


def text_sizes(bert_dir: str | Path | None, dropout: float | None = None) -> tuple[dict, int]:
    """(BERT sizes with the vocabulary grown by [DEC] and [ENC], pad id) of a BERT folder, or
    bert-base's when ``bert_dir`` is None."""
    if bert_dir is None:
        sizes, pad = dict(BERT_BASE), 0
    else:
        from medtune.models.blip2.bert_init import bert_sizes

        sizes, vocab, pad = bert_sizes(bert_dir)
        sizes["vocab_size"] = vocab + 2
    if dropout is not None:
        sizes.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return sizes, pad


def text_config(vision_width: int, sizes: dict, pad_token_id: int = 0):
    """A ``BlipTextConfig`` with cross-attention (to ``vision_width`` tokens) in every layer and
    BLIP's LM label smoothing 0.1; ``bos`` is ``[DEC]`` (first id past BERT's vocabulary)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        **sizes,
        encoder_hidden_size=vision_width,
        hidden_act="gelu",
        pad_token_id=pad_token_id,
        bos_token_id=sizes["vocab_size"] - 2,
        sep_token_id=None,  # only HF generation reads it; tiny vocabularies lack BERT's 102
        eos_token_id=None,
        is_decoder=True,  # builds the cross-attention blocks; the forward picks the mode
        label_smoothing=0.1,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def build_text(config, decoder: bool) -> tuple[nn.Module, nn.Module | None]:
    """(text encoder ``BlipTextModel`` without pooler, LM decoder or None), not yet tied."""
    from transformers import BlipTextLMHeadModel, BlipTextModel

    enc = BlipTextModel(config, add_pooling_layer=False)
    dec = BlipTextLMHeadModel(config) if decoder else None
    return enc, dec


def tie_encoder_decoder(encoder: nn.Module, decoder: nn.Module) -> list[str]:
    """Share every encoder block with the decoder except the self-attention (see module docstring).

    Args:
        encoder: the ``BlipTextModel`` text encoder.
        decoder: the ``BlipTextLMHeadModel``; its ``bert`` takes the encoder's modules.

    Returns:
        The decoder module paths now shared (``bert.embeddings``, ``bert.encoder.layer.N.*``).
    """
    shared = []
    dec = decoder.bert
    dec.embeddings = encoder.embeddings
    shared.append("bert.embeddings")
    for i, (le, ld) in enumerate(zip(encoder.encoder.layer, dec.encoder.layer, strict=True)):
        for part in ("crossattention", "intermediate", "output"):
            setattr(ld, part, getattr(le, part))
            shared.append(f"bert.encoder.layer.{i}.{part}")
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
    return shared


def _bert_state(bert_dir: str | Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A BERT folder's tensors named as ``med.py`` names them (no ``bert.`` prefix; ``cls.*``
    kept) and the names HF had to initialise (absent from the folder)."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a BertModel folder without the MLM head is normal
    hf_logging.disable_progress_bar()
    try:
        hf, info = BertForMaskedLM.from_pretrained(
            str(bert_dir), local_files_only=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    out = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("bert.")
        out[k] = v
    absent = {k.removeprefix("bert.") for k in info["missing_keys"]}
    return out, absent


@torch.no_grad()
def load_bert(module: nn.Module, bert_dir: str | Path, prefix: str = "") -> list[str]:
    """Copy a BERT folder into a ``BlipTextModel`` (``prefix=""``) or the ``bert.`` part and the
    ``cls.`` head of a ``BlipTextLMHeadModel`` (``prefix="bert."``). Rows past BERT's vocabulary
    ([DEC], [ENC]) and the cross-attention keep their random init, as in BLIP.

    Returns:
        The names loaded.
    """
    state, absent = _bert_state(bert_dir)
    own = dict(module.named_parameters(remove_duplicate=False))
    loaded = []
    for key, value in state.items():
        if key in absent:
            continue
        name = key if key.startswith("cls.") else prefix + key
        if name not in own or name.endswith("predictions.decoder.weight"):
            continue  # token_type_embeddings, pooler, NSP head; the LM matrix is the embedding
        dst = own[name]
        if dst.shape[0] > value.shape[0] and dst.shape[1:] == value.shape[1:]:
            dst[: value.shape[0]].copy_(value)  # the vocabulary grew by [DEC], [ENC]
        elif dst.shape == value.shape:
            dst.copy_(value)
        else:
            raise ValueError(
                f"{bert_dir}: '{key}' has shape {tuple(value.shape)}, BLIP's '{name}' is "
                f"{tuple(dst.shape)}"
            )
        loaded.append(name)
    return loaded
