"""Batched, KV-cached greedy / sampling decoding (:func:`generate`) for MedVLM and plain decoders.

Prompts are token ids (built with the real chat special tokens, image placeholders included) and
stay ids: nothing is decoded and re-encoded. A batch is left-padded; each row gets its own
position ids (starting at 0 at its first real token) and a causal mask that hides the padding, so
a prompt generates the same tokens alone or in a batch. Image embeddings enter once, at prefill;
decode steps feed one token per row through the KV cache.

Sampling: greedy (``temperature=0``), or temperature with optional top-k and top-p (nucleus);
``num_beams > 1`` runs :func:`medtune.generation.beam_search.beam_search` instead. ``repetition_penalty``
(CTRL/HF rule) and ``min_new_tokens`` act on the logits before sampling, as HF's logits processors.
A row stops at any of ``stop_tokens`` (``<|eot_id|>``, ``<|end_of_text|>``, ``<|eom_id|>`` by
default from the tokenizer), when its generated ids end with one of ``stop_sequences`` (multi-token
stop strings, e.g. MiniGPT-4's ``###``: matched exactly on each row's own tail, cut from the
output; a row's match never depends on the other rows, so a batch gives the per-sample outputs),
or after ``max_new_tokens``.

Moved here from ``medtune/generation.py``; import the public names from :mod:`medtune.generation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)

from medtune.generation.beam_search import beam_search
from medtune.generation.common import (
    block_tokens,
    check_stop_sequences,
    held_back,
    left_pad,
    model_forward,
    penalize_repeats,
    seen_tokens,
    teardown_caches,
)
from medtune.models.medvlm import output_at


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


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_tokens: Sequence[int],
    stop_sequences: Sequence[Sequence[int]] = (),
    images: dict[str, torch.Tensor] | None = None,
    image_counts: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    sync_next: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[list[int], list[int]], None] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Generate continuations for a batch of prompts.

    Args:
        model: a :class:`~medtune.models.medvlm.MedVLM` or a torchtune ``TransformerDecoder``.
        prompts: token id lists (may hold image placeholders; ragged lengths are left-padded).
        pad_id: padding id (never generated into outputs).
        stop_tokens: ids that end a row (not included in its output).
        stop_sequences: id sequences that end a row once its generated ids end with one (cut
            from its output; counted only when its last id is at position ``min_new_tokens`` or
            later). Streaming (``on_step``) holds back ids that could still start one.
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
        on_step: called after every decoding step with ``(rows, ids)``: the batch rows that got a
            new token this step (not a stop token) and those tokens, for streaming. Ids that
            could begin a stop sequence come in a later call (several calls per step then). Beam search
            knows its tokens only at the end: the calls then come after the search, one per position.
        num_beams: > 1 runs :func:`medtune.generation.beam_search.beam_search` (greedy, ``length_penalty``).
        length_penalty: beam search only: finished scores are ``sum logprob / n ** length_penalty``.
        repetition_penalty: CTRL/HF penalty on ids already in the row (prompt included); 1.0: off.
        min_new_tokens: the stop tokens are blocked until this many tokens are generated.

    Returns:
        Generated ids per prompt, without the prompt and without the stop token or sequence.
    """
    if not prompts:
        return []
    seqs = check_stop_sequences(stop_sequences)
    if num_beams > 1:
        return _beam(
            model,
            prompts,
            temperature=temperature,
            on_step=on_step,
            pad_id=pad_id,
            stop_tokens=stop_tokens,
            stop_sequences=seqs,
            images=images,
            image_counts=image_counts,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            use_cache=use_cache,
            sync_next=sync_next,
        )
    device = next(model.parameters()).device
    bsz = len(prompts)
    tokens, padding, plen = left_pad(prompts, pad_id, max_new_tokens, device)
    total = plen + max_new_tokens
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
    input_pos = get_position_ids_from_padding_mask(padding)
    stop = torch.tensor(sorted(set(stop_tokens)), device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(bsz)]
    emitted = [0] * bsz  # ids of each row already handed to on_step

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
                logits = model_forward(
                    model,
                    tokens[:, :plen],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, :plen],
                    input_pos=input_pos[:, :plen],
                )
            else:
                logits = model_forward(
                    model,
                    tokens[:, :plen],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, :plen, :plen],
                    input_pos=input_pos[:, :plen],
                )
        seen = None
        for step in range(max_new_tokens):
            scores = (logits[:, -1] if logits.dim() == 3 else logits).float()
            if repetition_penalty != 1.0:
                if seen is None:
                    seen = seen_tokens(prompts, scores.shape[-1], device)
                scores = penalize_repeats(scores, seen, repetition_penalty)
            if step < min_new_tokens:
                scores = block_tokens(scores, stop)
            nxt = sample_next(
                scores,
                temperature,
                top_k,
                top_p,
                generator,
            )
            if sync_next is not None:
                nxt = sync_next(nxt)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            is_stop = torch.isin(nxt, stop)
            new_rows = torch.nonzero(~done & ~is_stop).flatten().tolist()
            for i in new_rows:
                out[i].append(int(nxt[i]))
            if seqs and step >= min_new_tokens:
                for i in new_rows:
                    n = _stop_suffix(out[i], seqs)
                    if n:
                        del out[i][-n:]
                        is_stop[i] = True
            if on_step is not None:
                _stream(on_step, out, emitted, new_rows, is_stop, seqs)
            done |= is_stop
            if seen is not None:
                seen[torch.arange(bsz, device=device), nxt] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = plen + step
            tokens[:, pos] = nxt
            if use_cache:
                logits = model_forward(
                    model,
                    tokens[:, pos : pos + 1],
                    images=None,
                    image_counts=None,
                    mask=masks[:, pos : pos + 1],
                    input_pos=input_pos[:, pos : pos + 1],
                )
            else:
                logits = model_forward(
                    model,
                    tokens[:, : pos + 1],
                    images=images,
                    image_counts=image_counts,
                    mask=masks[:, : pos + 1, : pos + 1],
                    input_pos=input_pos[:, : pos + 1],
                )
    finally:
        if use_cache:
            teardown_caches(decoder)
    if on_step is not None:  # ids held back for a stop sequence that never completed
        _stream(on_step, out, emitted, list(range(bsz)), torch.ones(bsz, dtype=torch.bool), [])
    return out


def _stop_suffix(ids: list[int], seqs: list[list[int]]) -> int:
    """Length of the longest stop sequence ``ids`` ends with (0: none)."""
    return max((len(s) for s in seqs if len(s) <= len(ids) and ids[-len(s) :] == s), default=0)


def _stream(on_step, out, emitted, rows, ended, seqs) -> None:
    """Hand ``rows``' new ids to ``on_step``, one id per row per call; a running row keeps back
    the ids that could still begin a stop sequence, an ended row hands over all it has."""
    upto = {}
    for i in rows:
        upto[i] = len(out[i]) if bool(ended[i]) else len(out[i]) - held_back(out[i], seqs)
    while True:
        ready = [i for i in rows if emitted[i] < upto[i]]
        if not ready:
            return
        on_step(ready, [out[i][emitted[i]] for i in ready])
        for i in ready:
            emitted[i] += 1


def _beam(model, prompts, *, temperature: float, on_step, **kwargs) -> list[list[int]]:
    """``generate`` with ``num_beams > 1``: beam search, then ``on_step`` once per position."""
    if temperature > 0:
        raise ValueError("generate: beam search (num_beams > 1) does not sample: set temperature 0")
    out = beam_search(model, prompts, **kwargs)
    for j in range(max(map(len, out), default=0)) if on_step is not None else ():
        rows = [i for i, o in enumerate(out) if len(o) > j]
        on_step(rows, [out[i][j] for i in rows])
    return out
