"""Helpers shared by greedy / sampling decoding (:mod:`.sampling`) and beam search
(:mod:`.beam_search`): left padding, the repetition penalty, blocking stop tokens, stop
sequences, one model forward, KV-cache teardown. Moved here from ``medtune/generation.py`` (they were private there and
imported by ``medtune/beam_search.py``, which ``generation`` imported back: a cycle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def seen_tokens(prompts: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """[b, vocab] bool: which ids each prompt holds (what the repetition penalty acts on)."""
    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.as_tensor(list(p), dtype=torch.long, device=device)] = True
    return seen


def penalize_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL rule as HF's ``RepetitionPenaltyLogitsProcessor``.

    Args:
        scores: [b, v] logits (or log-probabilities, in beam search).
        seen: [b, v] bool, ids already in each sequence.
        penalty: > 1 discourages repeats: positive scores are divided by it, negative multiplied.

    Returns:
        [b, v] scores.
    """
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def block_tokens(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[b, v] scores with ``ids`` [n] set to -inf (``min_new_tokens``: no stop token yet)."""
    if ids.numel() == 0:
        return scores
    return scores.index_fill(-1, ids, float("-inf"))


def check_stop_sequences(stop_sequences) -> list[list[int]]:
    """``stop_sequences`` as lists of ints; refuses an empty sequence (it would stop every row).

    A stop sequence is a run of token ids that ends a row when its generated ids end with it
    (multi-token stop strings such as MiniGPT-4's ``###``); the ids are matched exactly, the
    sequence is cut from the output, and the match only counts once ``min_new_tokens`` tokens
    were generated before its last id (as stop tokens are blocked until then).
    """
    out = [[int(t) for t in s] for s in stop_sequences or ()]
    if any(not s for s in out):
        raise ValueError("generate: an empty stop sequence")
    return out


def held_back(ids: Sequence[int], stop_sequences: Sequence[Sequence[int]]) -> int:
    """How many trailing ``ids`` could still become a stop sequence (a proper prefix of one):
    streaming holds them back until the sequence either completes (they are cut) or breaks."""
    best = 0
    for s in stop_sequences:
        for k in range(min(len(s) - 1, len(ids)), best, -1):
            if list(ids[len(ids) - k :]) == list(s[:k]):
                best = k
                break
    return best


def stop_sequence_ends(
    seqs: torch.Tensor, t: int, stop_sequences: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Length of the stop sequence that generated position ``t`` completes, else 0.

    Args:
        seqs: [..., n] generated ids (position ``t`` just written).
        t: the position of the newest id.
        stop_sequences: the sequences (lists of ids).

    Returns:
        [...] long: the longest stop sequence ending at ``t`` (0: none).
    """
    cut = torch.zeros(seqs.shape[:-1], dtype=torch.long, device=seqs.device)
    for s in stop_sequences:
        if len(s) > t + 1:
            continue
        want = torch.as_tensor(s, dtype=seqs.dtype, device=seqs.device)
        hit = (seqs[..., t + 1 - len(s) : t + 1] == want).all(-1)
        cut = torch.where(hit, torch.clamp(cut, min=len(s)), cut)
    return cut


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int, device):
    """Left-pad prompts into ``[b, plen + max_new_tokens]`` ids and their padding mask.

    Returns:
        (tokens [b, total] long, padding [b, total] bool: True at real prompt tokens and at every
        generated slot, plen)
    """
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("generate: empty prompt")
    plen = max(lengths)
    total = plen + max_new_tokens
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros((len(prompts), total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) : plen] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        padding[i, plen - len(p) :] = True
    return tokens, padding, plen


def model_forward(model: nn.Module, tokens, *, images, image_counts, mask, input_pos):
    """One forward of a MedVLM (with images at prefill) or a plain decoder (logits)."""
    if images is not None:
        return model(
            tokens, images=images, image_counts=image_counts, mask=mask, input_pos=input_pos
        )
    return model(tokens, mask=mask, input_pos=input_pos)


def teardown_caches(decoder: nn.Module) -> None:
    """Remove KV caches so the model trains or evaluates without them afterwards."""
    from torchtune.modules import MultiHeadAttention

    for m in decoder.modules():
        if isinstance(m, MultiHeadAttention):
            m.kv_cache = None
            m.cache_enabled = False
    for attr in ("decoder_max_cache_seq_len", "encoder_max_cache_seq_len"):
        if hasattr(decoder, attr):
            setattr(decoder, attr, None)
