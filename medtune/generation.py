"""Batched, KV-cached generation for MedVLM and plain Llama-3 decoders.

Prompts are token ids (built with the real chat special tokens, image placeholders included) and
stay ids: nothing is decoded and re-encoded. A batch is left-padded; each row gets its own
position ids (starting at 0 at its first real token) and a causal mask that hides the padding, so
a prompt generates the same tokens alone or in a batch. Image embeddings enter once, at prefill;
decode steps feed one token per row through the KV cache.

Sampling: greedy (``temperature=0``), or temperature with optional top-k and top-p (nucleus).
A row stops at any of ``stop_tokens`` (``<|eot_id|>``, ``<|end_of_text|>``, ``<|eom_id|>`` by
default from the tokenizer) or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)

from medtune.models.medvlm import output_at


@dataclass
class GenerationConfig:
    """Settings recorded with every prediction (see DESIGN §3 "Predictions JSONL")."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    use_cache: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick next tokens.

    Args:
        logits: [b, v] float logits of the last position.
        temperature: 0 for greedy.
        top_k: keep the k most likely tokens.
        top_p: keep the smallest set whose probability mass reaches p.
        generator: RNG for sampling.

    Returns:
        [b] token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # drop tokens once the mass before them already reaches top_p (the first always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _forward(model: nn.Module, tokens, *, images, image_counts, mask, input_pos):
    if images is not None:
        return model(
            tokens, images=images, image_counts=image_counts, mask=mask, input_pos=input_pos
        )
    return model(tokens, mask=mask, input_pos=input_pos)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_tokens: Sequence[int],
    images: dict[str, torch.Tensor] | None = None,
    image_counts: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    sync_next: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of prompts.

    Args:
        model: a :class:`~medtune.models.medvlm.MedVLM` or a torchtune ``TransformerDecoder``.
        prompts: token id lists (may hold image placeholders; ragged lengths are left-padded).
        pad_id: padding id (never generated into outputs).
        stop_tokens: ids that end a row (not included in its output).
        images: encoder name -> [n_img, 3, H, W] for the batch's images in prompt order (MedVLM).
        image_counts: [b] images per prompt, checked against the placeholders.
        max_new_tokens: most tokens generated per row.
        temperature, top_k, top_p: sampling (temperature 0 = greedy).
        generator: RNG for sampling.
        use_cache: KV cache (True) or full recomputation each step (False; for checks).
        sync_next: called on every step's sampled tokens [b] before they are used; returns the
            tokens to use. An FSDP-sharded model passes a broadcast from rank 0 here, so that all
            ranks feed the same tokens and stop at the same step (a rank that stopped early would
            leave the others waiting in an all-gather). None: the sampled tokens as they are.

    Returns:
        Generated ids per prompt, without the prompt and without the stop token.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    bsz = len(prompts)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("generate: empty prompt")
    plen = max(lengths)
    total = plen + max_new_tokens
    tokens = torch.full((bsz, total), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros((bsz, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) : plen] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        padding[i, plen - len(p) :] = True  # real prompt tokens and every generated slot
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
    input_pos = get_position_ids_from_padding_mask(padding)
    stop = torch.tensor(sorted(set(stop_tokens)), device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(bsz)]

    decoder = getattr(model, "decoder", model)
    cache_dtype = next(decoder.parameters()).dtype
    if use_cache:
        if decoder.caches_are_setup():
            decoder.reset_caches()
        with device:  # torchtune's KVCache allocates on the default device
            decoder.setup_caches(bsz, cache_dtype, decoder_max_seq_len=total)
    last = torch.zeros((bsz, plen), dtype=torch.bool, device=device)
    last[:, -1] = (
        True  # prefill: logits at the last prompt position only ([b, vocab], not [b, plen, vocab])
    )
    try:
        with output_at(decoder, last):
            if use_cache:
                logits = _forward(
                    model,
                    tokens[:, :plen],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, :plen],
                    input_pos=input_pos[:, :plen],
                )
            else:
                logits = _forward(
                    model,
                    tokens[:, :plen],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, :plen, :plen],
                    input_pos=input_pos[:, :plen],
                )
        for step in range(max_new_tokens):
            nxt = sample_next(
                (logits[:, -1] if logits.dim() == 3 else logits).float(),
                temperature,
                top_k,
                top_p,
                generator,
            )
            if sync_next is not None:
                nxt = sync_next(nxt)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            is_stop = torch.isin(nxt, stop)
            for i in torch.nonzero(~done & ~is_stop).flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= is_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = plen + step
            tokens[:, pos] = nxt
            if use_cache:
                logits = _forward(
                    model,
                    tokens[:, pos : pos + 1],
                    images=None,
                    image_counts=None,
                    mask=masks[:, pos : pos + 1],
                    input_pos=input_pos[:, pos : pos + 1],
                )
            else:
                logits = _forward(
                    model,
                    tokens[:, : pos + 1],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, : pos + 1, : pos + 1],
                    input_pos=input_pos[:, : pos + 1],
                )
    finally:
        if use_cache:
            _teardown_caches(decoder)
    return out


def _teardown_caches(decoder: nn.Module) -> None:
    """Remove KV caches so the model trains or evaluates without them afterwards."""
    from torchtune.modules import MultiHeadAttention

    for m in decoder.modules():
        if isinstance(m, MultiHeadAttention):
            m.kv_cache = None
            m.cache_enabled = False
    for attr in ("decoder_max_cache_seq_len", "encoder_max_cache_seq_len"):
        if hasattr(decoder, attr):
            setattr(decoder, attr, None)
