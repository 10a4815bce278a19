"""BLIP-2 stage 1: a BERT-initialised Q-Former trained with ITC, ITM and ITG on a frozen encoder.

The architecture is LAVIS's ``Blip2Qformer`` (``lavis/models/blip2_models/blip2_qformer.py``) built
on transformers' own ``Blip2QFormerModel`` (the same layers: self-attention over queries and text,
cross-attention to the image every ``cross_attention_freq``-th layer for the query positions only,
separate feed-forward blocks for queries and text):

- ``ln_vision``: a LayerNorm over the frozen encoder's tokens (trained, as in LAVIS);
- ``query_tokens`` ``[1, Q, H]``: Q learned queries (32), N(0, 0.02);
- ``embeddings`` (word + position) and ``qformer`` initialised from a local HF BERT folder
  (bert-base-uncased in BLIP-2): BERT's embedding LayerNorm becomes ``qformer.layernorm``, each
  layer's self-attention and FFN load from BERT, the query FFN starts as a copy of BERT's FFN, the
  cross-attention layers start random. The vocabulary gains ``[DEC]`` (the ITG start token);
- ``vision_proj`` / ``text_proj`` to 256-d, ``itm_head`` (2 classes), ``temp`` = 0.07 (learned);
- an MLM-style LM head (``lm_head`` transform + a decoder tied to the word embeddings, ``lm_bias``).

Losses (:meth:`Blip2QFormer.forward`), as LAVIS:

- ITC: per-query similarity with the text's [CLS] feature, max over queries, / temp, cross-entropy
  with label smoothing 0.1 both ways. Under torchrun the features of every rank are gathered *with
  gradient*, so N ranks x batch B see N*B candidates.
- ITM: for each image one hard negative text and for each text one hard negative image, drawn from
  the softmaxed similarities (+1e-4) with the positive excluded; [queries; text] through the
  Q-Former bidirectionally, the mean of ``itm_head`` over the query outputs, 3B pairs.
- ITG: captioning: [DEC] + text, the text sees all queries and the text before it, the queries see
  only queries (and the image); label-smoothed (0.1) next-token loss, as LAVIS's ``BertLMHeadModel``.
  LAVIS reuses the query pass's key/value cache; here the queries run again in one joint pass with
  that mask (the same values: queries never see the text; dropout draws differ).

Reproducibility (what LAVIS leaves to the global RNG): hard negatives are drawn by inverse-CDF from
one ``torch.Generator`` seeded identically on every rank, over the similarity matrix of the whole
gathered batch, rows in the order of ``sample_keys`` (dataset indices). The draw for a sample then
does not depend on how the global batch is split over ranks, so 2 ranks x B equal 1 process x 2B.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.hard_negatives import draw_negatives
from medtune.utils.distributed import gather, summed
from medtune.utils.distributed import world as dist_world

DEC_TOKEN = "[DEC]"


# ----------------------------------------------------------------------------- hard negatives
@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, generator: torch.Generator | None, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """One negative column per row, drawn from ``softmax(sim) + 1e-4`` with the diagonal (the
    positive) at zero, as LAVIS does with ``torch.multinomial``
    (:func:`medtune.models.hard_negatives.draw_negatives` with LAVIS's weights).

    Args:
        sim: ``[M, M]`` similarities (logits) of the whole gathered batch; row i's positive is i.
        generator: a CPU generator (seeded the same on every rank); None: the global RNG.
        keys: ``[M]`` stable sample keys (dataset indices); rows and columns are visited in key
            order, so a sample's draw does not depend on its position in the batch.

    Returns:
        ``[M]`` int64 column index per row (never the row itself).
    """
    w = F.softmax(sim.float(), dim=1) + 1e-4
    w.fill_diagonal_(0)
    return draw_negatives(w, generator, keys)


# ----------------------------------------------------------------------------- model
def qformer_config(
    vision_width: int,
    *,
    hidden_size: int = 768,
    num_hidden_layers: int = 12,
    num_attention_heads: int = 12,
    intermediate_size: int = 3072,
    vocab_size: int = 30523,
    max_position_embeddings: int = 512,
    cross_attention_freq: int = 2,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
    layer_norm_eps: float = 1e-12,
    pad_token_id: int = 0,
    text_input: bool = True,
):
    """A ``transformers.Blip2QFormerConfig`` (bert-base sizes by default; ``text_input=False``
    leaves out the text feed-forward blocks, which stage 2 does not use)."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=hidden_dropout_prob,
        attention_probs_dropout_prob=attention_probs_dropout_prob,
        max_position_embeddings=max_position_embeddings,
        layer_norm_eps=layer_norm_eps,
        pad_token_id=pad_token_id,
        cross_attention_frequency=cross_attention_freq,
        encoder_hidden_size=vision_width,
        use_qformer_text_input=text_input,
        attn_implementation="sdpa",
    )


class Blip2Qformer(nn.Module):
    """BLIP-2's stage-1 Q-Former (see the module docstring).

    Args:
        vision_width: width of the frozen encoder's tokens.
        num_query_tokens: learned queries (32).
        embed_dim: ITC projection width (256).
        bos_token_id: the ``[DEC]`` id; pad_token_id: BERT's ``[PAD]``.
        **config: :func:`qformer_config` sizes (``hidden_size``, ``num_hidden_layers``, ...).
    """

    def __init__(
        self,
        vision_width: int,
        *,
        num_query_tokens: int = 32,
        embed_dim: int = 256,
        bos_token_id: int = 30522,
        pad_token_id: int = 0,
        **config,
    ):
        super().__init__()
        from transformers import Blip2QFormerModel
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        self.config = qformer_config(vision_width, pad_token_id=pad_token_id, **config)
        h = self.config.hidden_size
        self.vision_width, self.num_query_tokens = vision_width, num_query_tokens
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.ln_vision = nn.LayerNorm(vision_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, h))
        nn.init.normal_(self.query_tokens, std=self.config.initializer_range)
        self.embeddings = Blip2TextEmbeddings(self.config)
        self.qformer = Blip2QFormerModel(self.config)
        self.lm_head = BertPredictionHeadTransform(self.config)
        self.lm_bias = nn.Parameter(torch.zeros(self.config.vocab_size))
        self.vision_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))

    # ------------------------------------------------------------------ passes
    def encode_image(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image_embeds [b, n, vision_width] (frozen encoder tokens).

        Returns: (query outputs [b, Q, H], ln_vision(image_embeds) [b, n, vision_width]).
        """
        img = self.ln_vision(image_embeds.float())
        q = self.query_tokens.expand(img.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, query_length=q.shape[1], encoder_hidden_states=img)
        return out.last_hidden_state, img

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Args: input_ids, attention_mask [b, T] ([CLS] first). Returns: [CLS] output [b, H]."""
        emb = self.embeddings(input_ids=input_ids)
        out = self.qformer(query_embeds=emb, query_length=0, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]

    def image_feats(self, query_out: torch.Tensor) -> torch.Tensor:
        """[b, Q, H] -> normalized [b, Q, embed_dim]."""
        return F.normalize(self.vision_proj(query_out), dim=-1)

    def text_feat(self, cls_out: torch.Tensor) -> torch.Tensor:
        """[b, H] -> normalized [b, embed_dim]."""
        return F.normalize(self.text_proj(cls_out), dim=-1)

    @staticmethod
    def similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Per-query cosine, max over queries: [n_i, Q, D] x [n_t, D] -> [n_i, n_t]."""
        return torch.einsum("iqd,td->itq", image_feats, text_feat).amax(dim=-1)

    def itm_logits(
        self, img: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Matching logits [b, 2] of pairs (ln_vision'd image tokens [b, n, W], text [b, T])."""
        b, nq = img.shape[0], self.num_query_tokens
        q = self.query_tokens.expand(b, -1, -1)
        emb = self.embeddings(input_ids=input_ids, query_embeds=q)
        mask = torch.cat([attention_mask.new_ones(b, nq), attention_mask], dim=1)
        out = self.qformer(
            query_embeds=emb, query_length=nq, attention_mask=mask, encoder_hidden_states=img
        )
        return self.itm_head(out.last_hidden_state[:, :nq]).mean(dim=1)

    def lm_logits(
        self, img: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits [b, T, vocab] of the text conditioned on the queries (ITG mask)."""
        b, t, nq = input_ids.shape[0], input_ids.shape[1], self.num_query_tokens
        q = self.query_tokens.expand(b, -1, -1)
        emb = self.embeddings(input_ids=input_ids, query_embeds=q)
        allowed = torch.zeros(b, nq + t, nq + t, dtype=torch.bool, device=img.device)
        allowed[:, :, :nq] = True  # everyone sees the queries
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=img.device))
        allowed[:, nq:, nq:] = causal & attention_mask.bool()[:, None, :]
        neg = torch.finfo(emb.dtype).min
        mask = torch.zeros(allowed.shape, dtype=emb.dtype, device=img.device)
        mask = mask.masked_fill(~allowed, neg)[:, None]  # [b, 1, nq + t, nq + t], additive
        out = self.qformer(
            query_embeds=emb, query_length=nq, attention_mask=mask, encoder_hidden_states=img
        )
        hid = self.lm_head(out.last_hidden_state[:, nq:])
        return F.linear(hid, self.embeddings.word_embeddings.weight, self.lm_bias)

    # ------------------------------------------------------------------ losses
    def forward(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        sample_keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """ITC + ITM + ITG on a batch (this rank's share of the global batch).

        Args:
            image_embeds: [b, n, vision_width] frozen encoder tokens.
            input_ids, attention_mask: [b, T] BERT tokens of the captions ([CLS] first, padded).
            generator: draws the ITM hard negatives (seed it the same on every rank).
            sample_keys: [b] dataset indices (see :func:`sample_hard_negatives`).

        Returns:
            ``loss`` (their sum), ``loss_itc``, ``loss_itm``, ``loss_itg``: this rank's terms,
            scaled so that their mean over ranks is the loss of the whole global batch.
        """
        rank, world = dist_world()
        b = image_embeds.shape[0]
        query_out, img = self.encode_image(image_embeds)
        img_f = self.image_feats(query_out)  # [b, Q, D]
        txt_f = self.text_feat(self.encode_text(input_ids, attention_mask))  # [b, D]

        # ITC: local rows against every rank's candidates (gathered with gradient)
        img_all, txt_all = gather(img_f, True), gather(txt_f, True)
        sim_i2t = self.similarity(img_f, txt_all) / self.temp  # [b, world*b]
        sim_t2i = self.similarity(img_all, txt_f).t() / self.temp  # [b, world*b]
        targets = torch.arange(rank * b, rank * b + b, device=img_f.device)
        loss_itc = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
        ) / 2

        # ITM: hard negatives drawn over the whole global batch (same draws on every rank)
        with torch.no_grad():
            full = self.similarity(img_all.detach(), txt_all.detach()) / self.temp  # [M, M]
            keys = gather(sample_keys, False) if sample_keys is not None else None
            neg_txt = sample_hard_negatives(full, generator, keys)[rank * b : rank * b + b]
            neg_img = sample_hard_negatives(full.t(), generator, keys)[rank * b : rank * b + b]
        img_world = gather(img, True)
        ids_world, mask_world = gather(input_ids, False), gather(attention_mask, False)
        ids = torch.cat([input_ids, input_ids, ids_world[neg_txt]])  # pos, pos, neg text
        att = torch.cat([attention_mask, attention_mask, mask_world[neg_txt]])
        imgs = torch.cat([img, img_world[neg_img], img])  # pos, neg image, pos
        itm = self.itm_logits(imgs, ids, att)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm.device)
        loss_itm = F.cross_entropy(itm, labels)

        # ITG: [DEC] + caption, label-smoothed next-token loss over the global token count
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        tgt = dec_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
        logits = self.lm_logits(img, dec_ids, attention_mask)[:, :-1]
        lm_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            tgt.reshape(-1),
            ignore_index=-100,
            label_smoothing=0.1,
            reduction="sum",
        )
        n_tok = summed((tgt != -100).sum().float())
        loss_itg = lm_sum * world / n_tok.clamp(min=1)
        loss = loss_itc + loss_itm + loss_itg
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}


def blip2_qformer(
    vision_width: int,
    bert_dir: str | None = None,
    *,
    num_query_tokens: int = 32,
    embed_dim: int = 256,
    cross_attention_freq: int = 2,
    dropout: float | None = None,
) -> Blip2Qformer:
    """The stage-1 Q-Former, BERT-initialised from ``bert_dir`` as LAVIS's ``init_Qformer`` does.

    Args:
        vision_width: the frozen encoder's token width (the recipe passes ``encoder.out_dim``).
        bert_dir: a local HF BERT folder (bert-base-uncased for BLIP-2); None: bert-base sizes,
            random weights (for ``meta`` builds).
        num_query_tokens, embed_dim, cross_attention_freq: LAVIS's 32, 256, 2.
        dropout: override BERT's hidden and attention dropout (e.g. 0 for equivalence tests).
    """
    from medtune.models.blip2.bert_init import bert_sizes, load_bert_weights

    sizes, bos, pad = ({}, 30522, 0) if bert_dir is None else bert_sizes(bert_dir)
    if dropout is not None:
        sizes.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = Blip2Qformer(
        vision_width,
        num_query_tokens=num_query_tokens,
        embed_dim=embed_dim,
        bos_token_id=bos,
        pad_token_id=pad,
        cross_attention_freq=cross_attention_freq,
        **sizes,
    )
    if bert_dir is not None:
        load_bert_weights(model, bert_dir)
    return model


def bert_tokenizer(path: str):
    """The BERT tokenizer of ``path`` with ``[DEC]`` added as its ``bos_token`` (LAVIS's
    ``init_tokenizer``); ``[DEC]`` gets the id right after BERT's vocabulary."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer.path: {path} is not a folder (expected a HF BERT folder)"
        )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok
