"""Stage 2 of BLIP-2: a stage-1 Q-Former as a MedVLM connector, plus a linear map to the LLM.

:class:`Blip2QFormerConnector` (connector kind ``"blip2_qformer"``) is the query path of
:class:`medtune.models.blip2.qformer.Blip2Qformer` with the same parameter names (``ln_vision``,
``query_tokens``, ``qformer.*`` without the text feed-forward blocks) and ``proj``, LAVIS's
``opt_proj`` / ``llm_proj``: ``[b, n, d_in] -> [b, Q, d_llm]``. Its tensors load from a
``qformer_pretrain`` checkpoint through :func:`medtune.training.stage1.stage1_state_dict`.

Named MedVLMs built with it live in :mod:`medtune.models.builders`
(``medvlm_msmedcap_blip2_llama3_8b``, ``medvlm_biomedclip_blip2_llama3_8b``, ``tiny_blip2_medvlm``,
``tiny_msmedcap_blip2``); ``builders.build_connector("blip2_qformer", ...)`` builds it by kind.

Moved here from ``medtune/models/blip2_connector.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from medtune.models.blip2.qformer import qformer_config
from medtune.models.connectors import Connector


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
