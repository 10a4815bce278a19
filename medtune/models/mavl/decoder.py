"""MAVL's query decoder: a pre-norm DETR-style transformer decoder whose queries are the projected
concept embeddings and whose memory is the patch grid; it returns every layer's cross-attention
map (what zero-shot grounding reads).

Followed: ``Pretrain/models/transformer.py`` of HieuPhan33/CVPR2024_MAVL (``TransformerDecoder``,
``TransformerDecoderLayer.forward_pre`` with ``normalize_before=True``, ReLU feed-forward, no
positional embeddings). Module names are MAVL's, so its decoder weights load by name.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class QueryDecoderLayer(nn.Module):
    """Pre-norm layer: [self-attention], cross-attention to the patches, feed-forward.

    Args:
        d_model: width; heads: attention heads; dim_feedforward: FFN width (MAVL: 1024);
        dropout: dropout (MAVL: 0.1); self_attention: MAVL's ``self_attention`` switch (True).
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.self_attention = self_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(d_model)
            self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tgt ``[Q, B, d]`` queries; memory ``[P, B, d]`` patches.
        Returns: ``([Q, B, d], attention [B, Q, P] averaged over heads)``."""
        if self.self_attention:
            t = self.norm1(tgt)
            tgt = tgt + self.dropout1(self.self_attn(t, t, value=t, need_weights=False)[0])
        t = self.norm2(tgt)
        t, attn = self.multihead_attn(query=t, key=memory, value=memory)
        tgt = tgt + self.dropout2(t)
        t = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(t), attn


class QueryDecoder(nn.Module):
    """``num_layers`` copies of ``layer`` and a final LayerNorm.

    Returns ``(features [Q, B, d], [attention [B, Q, P] per layer])``.
    """

    def __init__(self, layer: QueryDecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attns = []
        for layer in self.layers:
            tgt, a = layer(tgt, memory)
            attns.append(a)
        return self.norm(tgt), attns
