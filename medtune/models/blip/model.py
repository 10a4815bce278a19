"""The BLIP model: ViT + BERT with cross-attention (ITC, ITM), a decoder sharing all but the
self-attention (LM), 256-d projections, momentum copies and feature queues.

Follows salesforce/BLIP ``models/blip_pretrain.py::BLIP_Pretrain`` (``decoder=True``) and
``models/blip_retrieval.py::BLIP_Retrieval`` (``decoder=False``, ``negative_all_rank=True``), with
the same attribute names, so a released ``model_base.pth`` maps by name
(:mod:`medtune.models.convert.blip`): ``visual_encoder`` (a timm ViT: BLIP's ``vit.py`` has timm's
parameter names), ``text_encoder``, ``text_decoder``, ``vision_proj``, ``text_proj``,
``itm_head``, ``temp`` (0.07, clamped to [0.001, 0.5] each step), ``visual_encoder_m``,
``vision_proj_m``, ``text_encoder_m``, ``text_proj_m`` (EMA, momentum 0.995), ``image_queue`` /
``text_queue`` ``[embed_dim, queue_size]`` (random unit columns at start), ``idx_queue``
``[1, queue_size]`` (-100 at start) and ``queue_ptr``.

:meth:`Blip.forward` computes ITC + ITM (+ LM) on this rank's share of a global batch; the terms
are scaled so that their mean over ranks is the loss of one process holding the whole global
batch (see :mod:`medtune.models.blip.losses` for what differs from BLIP and why).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.blip.losses import itc_distilled, itc_targets
from medtune.models.blip.text import (
    build_text,
    load_bert,
    text_config,
    text_sizes,
    tie_encoder_decoder,
)
from medtune.models.hard_negatives import draw_negatives
from medtune.utils.distributed import gather, summed
from medtune.utils.distributed import world as dist_world
from medtune.utils.errors import ConfigError


def vit_trunk(encoder: nn.Module) -> nn.Module:
    """The timm ViT inside a medtune :class:`~medtune.models.encoders.VisionEncoder`
    (``timm_vision`` or an open_clip timm tower such as BiomedCLIP's). BLIP needs every token,
    [CLS] first, after the final norm: ``trunk.forward_features(images)``."""
    kind = getattr(encoder, "kind", None)
    trunk = {"timm": lambda: encoder.tower, "open_clip_timm": lambda: encoder.tower.trunk}.get(
        kind, lambda: None
    )()
    if trunk is None or getattr(trunk, "cls_token", None) is None:
        raise ConfigError(
            "encoder: BLIP needs a timm ViT with a [CLS] token (medtune.models.encoders.timm_vision "
            f"or biomedclip_vision), got {type(encoder).__name__} kind={kind!r}"
        )
    if getattr(trunk, "num_prefix_tokens", 1) != 1:
        raise ConfigError("encoder: BLIP reads token 0 as [CLS]; register tokens are not supported")
    return trunk


class Blip(nn.Module):
    """BLIP (see the module docstring).

    Args:
        visual_encoder: a timm ViT (``forward_features`` -> ``[b, 1 + n, vision_width]``).
        vision_width: its token width.
        config: the ``BlipTextConfig`` (:func:`~medtune.models.blip.text.text_config`).
        embed_dim: ITC projection width (256).
        queue_size: queued momentum features (57600); a multiple of the global batch.
        momentum: EMA factor (0.995).
        decoder: build the LM decoder (pretraining); retrieval fine-tuning has none.
        enc_token_id: ``[ENC]``, replaces [CLS] for ITM; pad_token_id: BERT's [PAD].
        transform: image transform settings of the encoder.
    """

    def __init__(
        self,
        visual_encoder: nn.Module,
        vision_width: int,
        config,
        *,
        embed_dim: int = 256,
        queue_size: int = 57600,
        momentum: float = 0.995,
        decoder: bool = True,
        enc_token_id: int = 30523,
        pad_token_id: int = 0,
        transform: dict | None = None,
    ):
        super().__init__()
        self.config, self.transform = config, dict(transform or {})
        self.embed_dim, self.queue_size, self.momentum = embed_dim, queue_size, momentum
        self.bos_token_id, self.enc_token_id = config.bos_token_id, enc_token_id
        self.pad_token_id = pad_token_id
        text_width = config.hidden_size
        self.visual_encoder = visual_encoder
        self.text_encoder, text_decoder = build_text(config, decoder)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.visual_encoder_m = copy.deepcopy(visual_encoder)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.copy_params()
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if text_decoder is not None:
            tie_encoder_decoder(self.text_encoder, text_decoder)
        self.text_decoder = text_decoder

    # ------------------------------------------------------------------ momentum
    def model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def copy_params(self) -> None:
        """BLIP's ``copy_params``: momentum copies start equal and get no gradient."""
        for model, model_m in self.model_pairs():
            for p, pm in zip(model.parameters(), model_m.parameters(), strict=True):
                pm.copy_(p)
                pm.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = p_m * momentum + p * (1 - momentum)`` (BLIP's ``_momentum_update``)."""
        for model, model_m in self.model_pairs():
            pm, p = list(model_m.parameters()), [x.detach() for x in model.parameters()]
            torch._foreach_mul_(pm, self.momentum)
            torch._foreach_add_(pm, p, alpha=1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write the global batch's momentum features ``[M, D]`` and image ids ``[M]`` at the
        pointer (BLIP's ``_dequeue_and_enqueue``; ``queue_size % M == 0``)."""
        m, ptr = image_feat.shape[0], int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + m] = image_feat.T
        self.text_queue[:, ptr : ptr + m] = text_feat.T
        self.idx_queue[:, ptr : ptr + m] = idx.view(1, -1)
        self.queue_ptr[0] = (ptr + m) % self.queue_size

    # ------------------------------------------------------------------ passes
    def image_tokens(self, images: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """[b, 3, H, W] -> every ViT token ``[b, 1 + n, vision_width]`` ([CLS] first)."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        return vit.forward_features(images)

    def image_feat(self, tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """[CLS] token -> normalized ``[b, embed_dim]``."""
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(tokens[:, 0, :]), dim=-1)

    def text_feat(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False
    ) -> torch.Tensor:
        """Text mode ([CLS] first, no cross-attention) -> normalized ``[b, embed_dim]``."""
        enc, proj = (
            (self.text_encoder_m, self.text_proj_m)
            if momentum
            else (self.text_encoder, self.text_proj)
        )
        out = enc(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(proj(out.last_hidden_state[:, 0, :]), dim=-1)

    def itm_logits(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Multimodal mode: ``[ENC]`` replaces [CLS]; [b, 1+n, W] x [b, T] -> logits ``[b, 2]``."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        atts = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        out = self.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=atts,
        )
        return self.itm_head(out.last_hidden_state[:, 0, :])

    def lm_logits(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder: ``[DEC]`` replaces [CLS]; next-token logits ``[b, T - 1, vocab]``."""
        ids = input_ids.clone()
        ids[:, 0] = self.bos_token_id
        atts = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        return self.text_decoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=atts,
            return_logits=True,
        )

    # ------------------------------------------------------------------ losses
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        alpha: float,
        sample_keys: torch.Tensor,
        idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """ITC + ITM (+ LM when the model has a decoder) on this rank's batch.

        Args:
            images: ``[b, 3, H, W]``; input_ids, attention_mask: ``[b, T]`` BERT tokens
                ([CLS] first, padded to max length).
            alpha: momentum-distillation weight for this step.
            sample_keys: ``[b]`` dataset indices (order of the hard-negative draws).
            idx: ``[b]`` image ids: captions with the same id are ITC positives and never ITM
                negatives (retrieval); None: each pair is its own (pretraining).
            generator: the ITM draws (seeded alike on every rank).

        Returns:
            ``loss`` (their sum), ``loss_itc``, ``loss_itm`` and, with a decoder, ``loss_lm``.
        """
        rank, world = dist_world()
        b = images.shape[0]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.image_tokens(images)
        image_feat = self.image_feat(image_embeds)
        text_feat = self.text_feat(input_ids, attention_mask)
        ids = sample_keys if idx is None else idx
        idx_world = gather(ids, False)  # [M]

        # ---- ITC against the global batch's momentum features and the queue
        with torch.no_grad():
            self.momentum_update()
            image_feat_m = self.image_feat(self.image_tokens(images, True), True)
            text_feat_m = self.text_feat(input_ids, attention_mask, True)
            image_m_world, text_m_world = gather(image_feat_m, False), gather(text_feat_m, False)
            image_all = torch.cat([image_m_world.T, self.image_queue.clone()], dim=1)  # [D, M+Q]
            text_all = torch.cat([text_m_world.T, self.text_queue.clone()], dim=1)
            if idx is None:
                pos = torch.zeros(b, image_all.shape[1], dtype=torch.bool, device=images.device)
                pos[torch.arange(b), rank * b + torch.arange(b)] = True
            else:
                idx_all = torch.cat([idx_world, self.idx_queue.view(-1)])
                pos = idx.view(-1, 1) == idx_all.view(1, -1)
            t_i2t = itc_targets(image_feat_m @ text_all / self.temp, pos, alpha)
            t_t2i = itc_targets(text_feat_m @ image_all / self.temp, pos, alpha)
        loss_itc = (
            itc_distilled(image_feat @ text_all / self.temp, t_i2t)
            + itc_distilled(text_feat @ image_all / self.temp, t_t2i)
        ) / 2
        self.enqueue(image_m_world, text_m_world, idx_world)

        # ---- ITM with hard negatives drawn over the global batch
        with torch.no_grad():
            keys = gather(sample_keys, False)
            img_w, txt_w = gather(image_feat, False), gather(text_feat, False)
            if idx is None:  # BLIP_Pretrain: online vs momentum, softmax + 1e-4, diagonal 0
                w_i2t = F.softmax(img_w @ text_m_world.T / self.temp, dim=1) + 1e-4
                w_t2i = F.softmax(txt_w @ image_m_world.T / self.temp, dim=1) + 1e-4
                w_i2t.fill_diagonal_(0)
                w_t2i.fill_diagonal_(0)
            else:  # BLIP_Retrieval (negative_all_rank): online features, same image id at 0
                same = idx_world.view(-1, 1) == idx_world.view(1, -1)
                w_i2t = F.softmax(img_w @ txt_w.T / self.temp, dim=1).masked_fill(same, 0)
                w_t2i = F.softmax(txt_w @ img_w.T / self.temp, dim=1).masked_fill(same, 0)
            mine = slice(rank * b, rank * b + b)
            neg_txt = draw_negatives(w_i2t, generator, keys)[mine]  # a text for each image
            neg_img = draw_negatives(w_t2i, generator, keys)[mine]  # an image for each text
        embeds_world = gather(image_embeds, True)
        ids_world, mask_world = gather(input_ids, False), gather(attention_mask, False)
        itm = self.itm_logits(
            torch.cat([image_embeds, embeds_world[neg_img], image_embeds]),
            torch.cat([input_ids, input_ids, ids_world[neg_txt]]),
            torch.cat([attention_mask, attention_mask, mask_world[neg_txt]]),
        )
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm.device)
        loss_itm = F.cross_entropy(itm, labels)
        out = {"loss_itc": loss_itc, "loss_itm": loss_itm}

        # ---- LM: label-smoothed (0.1) next-token loss, mean over the global batch's tokens
        if self.text_decoder is not None:
            logits = self.lm_logits(image_embeds, input_ids, attention_mask)
            tgt = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == self.pad_token_id, -100)
            lm_sum = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                tgt.reshape(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
                reduction="sum",
            )
            n_tok = summed((tgt != -100).sum().float())
            out["loss_lm"] = lm_sum * world / n_tok.clamp(min=1)
        out["loss"] = sum(out.values())
        return {"loss": out.pop("loss"), **out}


def blip_model(
    vision: nn.Module,
    bert_dir: str | None = None,
    *,
    embed_dim: int = 256,
    queue_size: int = 57600,
    momentum: float = 0.995,
    decoder: bool = True,
    dropout: float | None = None,
    text_sizes_override: dict | None = None,
) -> Blip:
    """BLIP from a medtune vision encoder and a local HF BERT folder.

    Args:
        vision: a :class:`~medtune.models.encoders.VisionEncoder` over a timm ViT
            (``timm_vision('vit_base_patch16_224', checkpoint_path=DeiT-base)`` as BLIP, or
            ``biomedclip_vision``); its weights are BLIP's starting point.
        bert_dir: a HF BERT folder (bert-base-uncased as BLIP, PubMedBERT, BiomedCLIP's text
            tower); None: bert-base sizes, random weights (``meta`` builds, released checkpoints).
        embed_dim, queue_size, momentum: BLIP's 256, 57600, 0.995.
        decoder: the LM decoder (``blip_pretrain``); False for ``blip_retrieval``.
        dropout: override BERT's dropout (0 for exact equivalence tests).
        text_sizes_override: BERT sizes to use instead of the folder's / bert-base's
            (``hidden_size``, ``num_hidden_layers``, ``vocab_size`` incl. [DEC] and [ENC], ...;
            benchmarks and tests without a folder).
    """
    trunk = vit_trunk(vision)
    sizes, pad = text_sizes(bert_dir, dropout)
    sizes.update(text_sizes_override or {})
    config = text_config(trunk.num_features, sizes, pad)
    vocab = sizes["vocab_size"]
    model = Blip(
        trunk,
        trunk.num_features,
        config,
        embed_dim=embed_dim,
        queue_size=queue_size,
        momentum=momentum,
        decoder=decoder,
        enc_token_id=vocab - 1,
        pad_token_id=pad,
        transform=getattr(vision, "transform", None),
    )
    if bert_dir is not None:
        load_bert(model.text_encoder, bert_dir)
        if model.text_decoder is not None:
            load_bert(model.text_decoder, bert_dir, prefix="bert.")  # its self-attention, LM head
        model.copy_params()
    return model
