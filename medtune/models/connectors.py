"""Connectors: encoder tokens ``[b, n, d_in]`` -> LLM embeddings ``[b, N, d_out]``.

The registry of kinds and ``build_connector`` live in :mod:`medtune.models.builders` (it also
knows the BLIP-2 Q-Former connector, :mod:`medtune.models.blip2.connector`). Every connector knows its output token count through ``num_tokens(n_in)`` so the prompt can hold
exactly N placeholders per image.

- :class:`LinearConnector`: one linear map per token (N = n).
- :class:`MLPConnector`: LLaVA-1.5's 2-layer GELU MLP (N = n).
- :class:`PooledUnfold`: medcap's: one pooled vector (tokens are mean-pooled first if n > 1) ->
  a linear map to N * d_out, unfolded into N tokens.
- :class:`LearnedQueryConnector` (kind ``learned_queries``): N learned queries, each layer
  self-attention over the queries, cross-attention to the image tokens, an MLP; then a linear map
  to d_out. Small and randomly initialised; BLIP-2's BERT-shaped Q-Former is
  :class:`medtune.models.blip2.connector.Blip2QFormerConnector` (kind ``blip2_qformer``).
- :class:`Resampler`: Flamingo's Perceiver resampler: N latents attend to [image tokens; latents].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class Connector(nn.Module):
    """Base: records ``in_dim`` and ``out_dim``; subclasses define ``num_tokens``."""

    in_dim: int
    out_dim: int

    def num_tokens(self, n_in: int) -> int:
        """Output tokens per image for ``n_in`` input tokens."""
        raise NotImplementedError


class LinearConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim]. Returns: [b, n, out_dim]."""
        return self.proj(x)


class MLPConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden_dim = hidden_dim or out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim]. Returns: [b, n, out_dim]."""
        return self.fc2(self.act(self.fc1(x)))


class PooledUnfold(Connector):
    """A pooled embedding unfolded into ``num_tokens`` LLM tokens: one linear map, or with
    ``hidden_dim`` medcap's ``Sequential(Linear(in, hidden), GELU(), Linear(hidden, N * out))``
    (parameter names ``proj.0`` / ``proj.2``, as medcap's ``projector``)."""

    def __init__(
        self, in_dim: int, out_dim: int, num_tokens: int = 32, hidden_dim: int | None = None
    ):
        super().__init__()
        self.in_dim, self.out_dim, self.n = in_dim, out_dim, num_tokens
        if hidden_dim is None:
            self.proj = nn.Linear(in_dim, num_tokens * out_dim)
        else:
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.GELU(),
                nn.Linear(hidden_dim, num_tokens * out_dim),
            )

    def num_tokens(self, n_in: int) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim] (n = 1 for a pooled encoder). Returns: [b, N, out_dim]."""
        pooled = x.mean(dim=1)
        return self.proj(pooled).view(x.shape[0], self.n, self.out_dim)


class _CrossBlock(nn.Module):
    """Pre-norm block: [self-attention over queries], cross-attention to context, MLP."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, self_attn: bool, mlp_ratio: float = 4.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self_attn else None
        self.norm_sa = nn.LayerNorm(dim) if self_attn else None
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(ctx_dim)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=ctx_dim, vdim=ctx_dim, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            h = self.norm_sa(q)
            q = q + self.self_attn(h, h, h, need_weights=False)[0]
        c = self.norm_ctx(ctx)
        q = q + self.cross(self.norm_q(q), c, c, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class LearnedQueryConnector(Connector):
    """N learned queries read the image tokens (was ``QFormer``, kind ``qformer``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_dim: int = 768,
        num_layers: int = 2,
        num_heads: int = 8,
    ):
        super().__init__()
        self.in_dim, self.out_dim, self.n = in_dim, out_dim, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(
            _CrossBlock(hidden_dim, in_dim, num_heads, self_attn=True) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim]. Returns: [b, num_queries, out_dim]."""
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, x)
        return self.proj(self.norm(q))


class Resampler(Connector):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 64,
        hidden_dim: int = 1024,
        num_layers: int = 2,
        num_heads: int = 8,
    ):
        super().__init__()
        self.in_dim, self.out_dim, self.n = in_dim, out_dim, num_latents
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(
            _CrossBlock(hidden_dim, hidden_dim, num_heads, self_attn=False)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, n, in_dim]. Returns: [b, num_latents, out_dim]."""
        x = self.in_proj(x)
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            lat = layer(lat, torch.cat([x, lat], dim=1))  # Perceiver: keys include the latents
        return self.proj(self.norm(lat))


ConnectorKind = Literal[
    "linear", "mlp", "pooled_unfold", "learned_queries", "resampler", "blip2_qformer"
]
"""The connector names builders accept (``medtune validate`` checks config values against it);
:func:`medtune.models.builders.build_connector` builds one by name."""
