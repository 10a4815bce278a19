"""Stage 2 of BLIP-2: a stage-1 Q-Former as a MedVLM connector, plus a linear map to the LLM.

:class:`Blip2QFormerConnector` (connector kind ``"blip2_qformer"``) is the query path of
:class:`medtune.models.qformer_blip2.Blip2Qformer` with the same parameter names (``ln_vision``,
``query_tokens``, ``qformer.*`` without the text feed-forward blocks) and ``proj``, LAVIS's
``opt_proj`` / ``llm_proj``: ``[b, n, d_in] -> [b, Q, d_llm]``. Its tensors load from a
``qformer_pretrain`` checkpoint with :func:`medtune.training.stage1.load_stage1`.

Which part trains (``trainable.connector``, :func:`set_connector_trainable`): ``full`` (Q-Former
and projection: BLIP-2 / MSMedCap stage 2), ``projection`` (only ``proj``: XrayGPT, whose Q-Former
stays frozen), ``frozen``.

Named builders: :func:`medvlm_msmedcap_blip2_llama3_8b` (SAM + BiomedCLIP, a Q-Former each),
:func:`medvlm_biomedclip_blip2_llama3_8b` (XrayGPT-style: one encoder), and the tiny
:func:`tiny_blip2_medvlm` / :func:`tiny_msmedcap_blip2` for tests.
"""

from __future__ import annotations

import torch
from torch import nn

from medtune.models.connectors import CONNECTORS, Connector
from medtune.models.qformer_blip2 import qformer_config

CONNECTOR_STATES = ("full", "projection", "frozen")


class Blip2QFormerConnector(Connector):
    """BLIP-2 Q-Former (query path) + linear projection.

    Args:
        in_dim: encoder token width; out_dim: LLM embedding width.
        num_query_tokens: queries = image tokens for the LLM (32).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
        cross_attention_freq: the stage-1 Q-Former's sizes (bert-base: 768, 12, 12, 3072, 2).
        dropout: hidden and attention dropout (BERT's 0.1).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_query_tokens: int = 32,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        from transformers import Blip2QFormerModel

        self.in_dim, self.out_dim, self.n = in_dim, out_dim, num_query_tokens
        self.config = qformer_config(
            in_dim,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            cross_attention_freq=cross_attention_freq,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            text_input=False,
        )
        self.ln_vision = nn.LayerNorm(in_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, hidden_size))
        nn.init.normal_(self.query_tokens, std=self.config.initializer_range)
        self.qformer = Blip2QFormerModel(self.config)
        self.proj = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim]. Returns: [b, num_query_tokens, out_dim]."""
        img = self.ln_vision(x.float())
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, query_length=q.shape[1], encoder_hidden_states=img)
        return self.proj(out.last_hidden_state)


CONNECTORS["blip2_qformer"] = Blip2QFormerConnector


def set_connector_trainable(model: nn.Module, state: str, key: str = "trainable.connector") -> None:
    """Choose what trains inside every connector of a MedVLM (after ``set_trainable``).

    Args:
        model: a MedVLM.
        state: ``full`` (everything), ``projection`` (only each connector's ``proj.*``; needs
            connectors that have one: ``blip2_qformer``, ``qformer``, ``resampler``), ``frozen``.
        key: the config key, for messages.

    Raises:
        ConfigError: an unknown state, or ``projection`` with a connector without ``proj``.
    """
    from medtune.utils.errors import ConfigError

    if state not in CONNECTOR_STATES:
        raise ConfigError(f"{key}: {state!r} is not one of {', '.join(CONNECTOR_STATES)}")
    for name, conn in model.connectors.items():
        if state == "projection" and not isinstance(getattr(conn, "proj", None), nn.Linear):
            raise ConfigError(
                f"{key}: 'projection' needs a connector with a projection; connector '{name}' "
                f"is a {type(conn).__name__}"
            )
        for pname, p in conn.named_parameters():
            p.requires_grad_(
                state == "full" or (state == "projection" and pname.startswith("proj."))
            )


# ----------------------------------------------------------------------------- named builders
def _connector_kwargs(num_query_tokens: int, sizes: dict | None) -> dict:
    return {"num_query_tokens": num_query_tokens, **(sizes or {})}


def medvlm_msmedcap_blip2_llama3_8b(
    encoder_path: str | None = None,
    sam_checkpoint: str | None = None,
    num_query_tokens: int = 32,
    sam_image_size: int = 1024,
):
    """MSMedCap stage 2: SAM ViT-B (``sam``) and BiomedCLIP (``clip``), each read by its own
    bert-base BLIP-2 Q-Former (32 queries) + a linear map into Llama-3-8B-Instruct (64 image
    tokens per image, SAM's first). Load the two stage-1 runs with ``init_from: {sam: ..., clip: ...}``.
    """
    from medtune.models import llama3 as _llama3
    from medtune.models.builders import medvlm, msmedcap_encoders

    return medvlm(
        _llama3.llama3_8b(),
        msmedcap_encoders(encoder_path, sam_checkpoint, sam_image_size),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, None),
    )


def medvlm_biomedclip_blip2_llama3_8b(encoder_path: str | None = None, num_query_tokens: int = 32):
    """XrayGPT-style: BiomedCLIP patch tokens -> bert-base BLIP-2 Q-Former + linear -> Llama-3-8B
    (the encoder is named ``image``; XrayGPT trains only the projection: ``trainable.connector:
    projection``)."""
    from medtune.models import llama3 as _llama3
    from medtune.models.builders import medvlm
    from medtune.models.encoders import biomedclip_vision

    return medvlm(
        _llama3.llama3_8b(),
        biomedclip_vision(encoder_path, output="patch"),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, None),
    )


def tiny_blip2_medvlm(
    assets_dir: str, encoder_path: str, num_query_tokens: int = 4, sizes: dict | None = None
):
    """The tiny Llama-3 of the generated assets with any open_clip tower (hub folder) through a
    tiny Q-Former connector (``sizes``: the stage-1 Q-Former's, e.g. the tiny BERT's)."""
    from medtune.models import llama3 as _llama3
    from medtune.models.builders import image_token_id_for_vocab, medvlm
    from medtune.models.encoders import open_clip_vision

    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    return medvlm(
        dec,
        open_clip_vision(encoder_path, output="patch"),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, sizes),
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )


def tiny_sam_vision(image_size: int = 64):
    """A random 2-block SAM-style timm encoder (of ``builders.tiny_msmedcap`` and
    :func:`tiny_msmedcap_blip2`)."""
    from medtune.models.encoders import timm_vision

    return timm_vision(
        "samvit_base_patch16",
        image_size=image_size,
        depth=2,
        embed_dim=32,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=2,
        neck_chans=24,
    )


def tiny_msmedcap_blip2(
    assets_dir: str, clip_path: str, num_query_tokens: int = 4, sizes: dict | None = None
):
    """Tiny MSMedCap stage 2: the tiny SAM (``sam``) and an open_clip tower (``clip``), a tiny
    Q-Former connector each, into the tiny Llama-3."""
    from medtune.models import llama3 as _llama3
    from medtune.models.builders import image_token_id_for_vocab, medvlm
    from medtune.models.encoders import open_clip_vision

    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    return medvlm(
        dec,
        {"sam": tiny_sam_vision(), "clip": open_clip_vision(clip_path, output="patch")},
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, sizes),
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )
