"""MedVLM: image encoder(s) + connector(s) + a torchtune decoder of any LLM family.

The prompt carries each image as N copies of the placeholder id (chosen per family in
:mod:`medtune.models.llm.placeholder`: Llama-3's reserved token, or a negative id that never
indexes the embedding table).
``forward`` embeds the text tokens with the decoder's own embedding, replaces the placeholder
positions with the connector outputs (row-major: sample by sample, image by image), and runs the
decoder. The decoder's state dict is untouched (``decoder.tok_embeddings.weight`` etc.), so
torchtune's checkpointers load real Llama-3 weights into ``model.decoder`` directly.

KV-cache decoding: call ``setup_caches`` then pass ``images`` at prefill only; later steps carry no
placeholders.

Several encoders: ``fuse="sequence"`` gives each encoder its own connector and concatenates their
tokens (N = sum of N_i, encoder order); ``fuse="channel"`` concatenates the encoders' token features
(equal token counts required) and feeds one connector named ``"fused"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchtune.modules import TransformerDecoder


@contextlib.contextmanager
def output_at(decoder: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While inside, ``decoder``'s output projection runs only at the positions in ``keep``.

    Training needs logits only where there is a target (the answer tokens: often a tenth of the
    sequence), and generation's prefill only at the last prompt position; projecting every position onto Llama-3's 128,256-word vocabulary costs time and,
    in fp32, gigabytes ([8, 512, 128256] logits are 2.1 GB, and as much again for their gradient).
    A forward pre-hook on ``decoder.output`` selects the hidden states, so parameter names, FSDP
    units and LoRA on the output layer stay as they are.

    Args:
        decoder: a torchtune ``TransformerDecoder`` (without output chunking).
        keep: [b, s] bool, the positions whose logits are needed.

    The decoder then returns ``[n_keep, vocab]`` logits instead of ``[b, s, vocab]``. Decoders whose
    ``output`` is not a module (tied embeddings) or that chunk their output are left alone.
    """
    out = getattr(decoder, "output", None)
    if not isinstance(out, nn.Module) or getattr(decoder, "num_output_chunks", 0):
        yield
        return

    def select(_module, args):
        return (args[0][keep], *args[1:])  # [b, s, d] -> [n_keep, d]

    handle = out.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


class PassThroughEmbedding(nn.Embedding):
    """An ``nn.Embedding`` that returns already-embedded (floating) input unchanged.

    MedVLM embeds and fuses before calling the decoder, then passes the fused embeddings through
    ``decoder.forward`` (so FSDP and torchtune's hooks on the decoder run as usual).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        return super().forward(x)


class ImageTokenError(ValueError):
    """Placeholder count does not match the images given."""


def _own_output(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: a view output becomes a tensor of its own (see ``MedVLM.__init__``)."""
    return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out


class MedVLM(nn.Module):
    """Encoders + connectors + decoder.

    Args:
        decoder: a torchtune ``TransformerDecoder`` (Llama-3, Llama-2 / Vicuna, Mistral, Qwen2.5).
        encoders: name -> encoder with ``num_tokens``, ``out_dim``, ``transform``; forward
            ``[n, 3, H, W] -> [n, t, d]``.
        connectors: name -> connector (same names as ``encoders`` for ``fuse="sequence"``, or a
            single ``"fused"`` for ``fuse="channel"``).
        image_token_id: the placeholder id.
        fuse: ``"sequence" | "channel"``.

    Raises:
        ValueError: on any width or token-count mismatch between the parts, naming them.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        encoders: dict[str, nn.Module],
        connectors: dict[str, nn.Module],
        image_token_id: int,
        fuse: str = "sequence",
    ):
        super().__init__()
        if not encoders:
            raise ValueError("MedVLM needs at least one encoder")
        self.decoder = decoder
        self.encoders = nn.ModuleDict(encoders)
        self.connectors = nn.ModuleDict(connectors)
        self.image_token_id = int(image_token_id)
        self.fuse = fuse
        emb = decoder.tok_embeddings
        if type(emb) is nn.Embedding:
            new = PassThroughEmbedding(emb.num_embeddings, emb.embedding_dim, device="meta")
            new.weight = emb.weight
            decoder.tok_embeddings = new
        self.embed_dim = decoder.tok_embeddings.embedding_dim
        vocab = decoder.tok_embeddings.num_embeddings
        # a reserved id inside the table (Llama-3) or a negative one that no tokenizer produces
        # (the other families): the rule lives in medtune.models.llm.placeholder
        if self.image_token_id >= vocab:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the decoder's vocabulary of {vocab} "
                "(use a reserved id inside it, or a negative id: see medtune.models.llm.placeholder)"
            )
        self.tokens_per_image = self._check_shapes()
        # Encoders and connectors are FSDP2 units. Their outputs are often views (a token slice,
        # a linear layer's reshape), and an in-place op on a unit's view output drops FSDP2's
        # pre-backward hook (all-gather skipped, wrong gradients). Give them outputs of their own.
        for part in (*self.encoders.values(), *self.connectors.values()):
            part.register_forward_hook(_own_output)

    def _check_shapes(self) -> int:
        if self.fuse == "sequence":
            if set(self.connectors) != set(self.encoders):
                raise ValueError(
                    f"fuse='sequence' needs one connector per encoder: encoders {sorted(self.encoders)}, "
                    f"connectors {sorted(self.connectors)}"
                )
            total = 0
            for name, enc in self.encoders.items():
                total += self._check_pair(name, enc.out_dim, enc.num_tokens, self.connectors[name])
            return total
        if self.fuse == "channel":
            if list(self.connectors) != ["fused"]:
                raise ValueError("fuse='channel' needs exactly one connector named 'fused'")
            counts = {n: e.num_tokens for n, e in self.encoders.items()}
            if len(set(counts.values())) != 1:
                raise ValueError(
                    f"fuse='channel' needs equal token counts per encoder, got {counts}; use fuse='sequence'"
                )
            width = sum(e.out_dim for e in self.encoders.values())
            return self._check_pair(
                "fused", width, next(iter(counts.values())), self.connectors["fused"]
            )
        raise ValueError(f"unknown fuse {self.fuse!r}: expected 'sequence' or 'channel'")

    def _check_pair(self, name: str, width: int, n_in: int, conn: nn.Module) -> int:
        if getattr(conn, "in_dim", width) != width:
            raise ValueError(
                f"connector '{name}' expects {conn.in_dim}-d input but encoder output is {width}-d"
            )
        if getattr(conn, "out_dim", self.embed_dim) != self.embed_dim:
            raise ValueError(
                f"connector '{name}' outputs {conn.out_dim}-d tokens but the LLM embedding is {self.embed_dim}-d"
            )
        return conn.num_tokens(n_in) if hasattr(conn, "num_tokens") else n_in

    @property
    def image_transforms(self) -> dict[str, dict]:
        """Encoder name -> transform settings (see :func:`medtune.data.images.image_transform`)."""
        return {name: enc.transform for name, enc in self.encoders.items()}

    def encode_images(self, images: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images -> LLM-space tokens.

        Args:
            images: encoder name -> [n_img, 3, H, W] (a bare tensor is accepted with one encoder).

        Returns:
            [n_img, tokens_per_image, embed_dim].
        """
        if isinstance(images, torch.Tensor):
            if len(self.encoders) != 1:
                raise ValueError(
                    f"several encoders ({', '.join(self.encoders)}): pass images as a dict by encoder name"
                )
            images = {next(iter(self.encoders)): images}
        if set(images) != set(self.encoders):
            raise ValueError(
                f"images given for {sorted(images)} but encoders are {sorted(self.encoders)}"
            )
        feats = {name: enc(images[name]) for name, enc in self.encoders.items()}
        if self.fuse == "channel":
            return self.connectors["fused"](torch.cat(list(feats.values()), dim=-1))
        return torch.cat([self.connectors[n](f) for n, f in feats.items()], dim=1)

    def embed(
        self, tokens: torch.Tensor, images=None, image_counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids + images -> fused input embeddings [b, s, embed_dim]."""
        is_img = tokens == self.image_token_id
        h = self.decoder.tok_embeddings(tokens.masked_fill(is_img, 0))
        per_sample = is_img.sum(dim=1)
        n_ph = int(per_sample.sum())
        if images is None:
            if n_ph:
                raise ImageTokenError(
                    f"the prompt holds {n_ph} image placeholders but no images were given"
                )
            return h
        img = self.encode_images(images)
        n_img, n_tok = img.shape[0], img.shape[1]
        if image_counts is not None:
            want = image_counts.to(per_sample.device) * n_tok
            bad = (want != per_sample).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise ImageTokenError(
                    f"sample {i} holds {int(per_sample[i])} image placeholders but has "
                    f"{int(image_counts[i])} image(s) x {n_tok} tokens = {int(want[i])}"
                )
        if n_ph != n_img * n_tok:
            raise ImageTokenError(
                f"the batch holds {n_ph} image placeholders but {n_img} image(s) x {n_tok} tokens "
                f"= {n_img * n_tok} were given"
            )
        return h.masked_scatter(is_img.unsqueeze(-1), img.reshape(-1, img.shape[-1]).to(h.dtype))

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        images=None,
        image_counts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            tokens: [b, s] ids with placeholders.
            images: encoder name -> [n_img, 3, H, W], images of the batch in sample order; None for
                text-only input or KV-cache decode steps.
            image_counts: [b] images per row (checked against the placeholders when given); a
                packed row (:mod:`medtune.data.packing`) holds several samples' images, in order.
            mask: [b, s, s] (or [b, s, cache_len]) boolean attention mask, or a flex-attention
                ``BlockMask`` for packed rows on CUDA, as torchtune's decoder.
            input_pos: [b, s] positions (restarting per sample in packed rows), as torchtune's decoder.

        Returns:
            logits [b, s, vocab] (float32), or a list of chunks when output chunking is set.
        """
        h = self.embed(tokens, images, image_counts)
        return self.decoder(h, mask=mask, input_pos=input_pos)

    # KV-cache helpers, delegated to the decoder
    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, *, decoder_max_seq_len: int | None = None
    ) -> None:
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        self.decoder.reset_caches()
