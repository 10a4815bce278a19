"""Batched, KV-cached beam search for MedVLM and plain Llama-3 decoders.

The rules are Hugging Face transformers' beam search (``GenerationMixin._beam_search``, 5.x, with its
default ``early_stopping=False``), which LAVIS calls for BLIP-2 captions, so beam settings carried
over from those papers mean the same here:

- Each step takes the top ``C = max(2, 1 + n_stop) * num_beams`` continuations of all beams of a
  sample by summed log-probability (C > num_beams, so enough beams that did not stop remain);
  ``n_stop`` counts the stop tokens and the stop sequences.
- A continuation that ends (a stop token, a stop sequence its ids now end with, or the
  ``max_new_tokens``-th token) and ranks among the
  first ``num_beams`` of the C becomes a finished hypothesis scored ``sum logprob / n ** lp``, ``n``
  the number of generated tokens including the stop token (or sequence), ``lp`` =
  ``length_penalty``; a sample
  keeps its ``num_beams`` best finished ones. The best ``num_beams`` continuations that did not end
  are the next step's beams.
- A sample is done once it holds ``num_beams`` finished hypotheses and its best running beam,
  normalised at its current length, scores no better than the worst of them (HF's heuristic; with
  ``lp > 0`` a longer beam could in principle still win).
- ``repetition_penalty`` (the CTRL rule: a score is divided by the penalty when positive,
  multiplied when negative) applies to every token already in the beam's sequence, prompt
  included, padding excluded; ``min_new_tokens`` blocks the stop tokens while fewer have been
  generated. Both act on the log-probabilities, as in HF's beam search.

The prompt batch is left-padded as in :func:`medtune.generation.sampling.generate`. The prefill runs once
per sample (images encoded once), then each KV cache is repeated ``num_beams`` times along the
batch and, every step, gathered by the beams' source indices. The result is the best finished
hypothesis per prompt, without the stop token or stop sequence. Stop sequences (multi-token stop
strings, e.g. MiniGPT-4's ``###``) are matched exactly on each candidate's own ids, and only when
their last id comes at position ``min_new_tokens`` or later (stop tokens are blocked until then).

Moved here from ``medtune/beam_search.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)

from medtune.generation.common import (
    block_tokens,
    check_stop_sequences,
    left_pad,
    model_forward,
    penalize_repeats,
    seen_tokens,
    stop_sequence_ends,
    teardown_caches,
)
from medtune.models.medvlm import output_at

_NEG = -1.0e9  # HF's "never pick this" offset; kept as is so near-ties resolve as in HF


def _kv_caches(decoder: nn.Module) -> list[nn.Module]:
    from torchtune.modules import KVCache

    return [m for m in decoder.modules() if isinstance(m, KVCache)]


def _beam_images(images, image_counts, rows: torch.Tensor):
    """Images repeated per beam row (only for the no-cache path, which re-encodes every step)."""
    if images is None:
        return None, None
    if image_counts is None:
        raise ValueError("beam_search: use_cache=False with images needs image_counts")
    counts = image_counts.to(rows.device)
    starts = torch.cumsum(counts, 0) - counts
    idx = [i for r in rows.tolist() for i in range(int(starts[r]), int(starts[r] + counts[r]))]
    idx = torch.tensor(idx, dtype=torch.long)
    return {k: v[idx.to(v.device)] for k, v in images.items()}, counts[rows]


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_tokens: Sequence[int],
    stop_sequences: Sequence[Sequence[int]] = (),
    images: dict[str, torch.Tensor] | None = None,
    image_counts: torch.Tensor | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
    sync_next: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Beam search over a batch of prompts (see the module docstring for the rules).

    Args:
        model: a :class:`~medtune.models.medvlm.MedVLM` or a torchtune ``TransformerDecoder``.
        prompts: token id lists (may hold image placeholders; ragged lengths are left-padded).
        pad_id: padding id.
        stop_tokens: ids that end a hypothesis (not included in the output).
        stop_sequences: id sequences that end a hypothesis whose ids end with one (cut from
            the output).
        images: encoder name -> [n_img, 3, H, W], the batch's images in prompt order (MedVLM).
        image_counts: [b] images per prompt.
        num_beams: beams per prompt (>= 1).
        max_new_tokens: most tokens generated per prompt.
        min_new_tokens: stop tokens are blocked until this many tokens are generated.
        length_penalty: exponent of the length that divides a finished hypothesis's log-probability.
        repetition_penalty: CTRL/HF penalty on tokens already in the sequence (1.0: none).
        use_cache: KV cache (True) or full recomputation each step (False; for checks).
        sync_next: called on each step's top candidates (flat indices [b, C] int64, then their
            scores [b, C] float32) before they are used; an FSDP-sharded model passes a
            broadcast from rank 0 so that all ranks keep the same beams and stop together.

    Returns:
        The best hypothesis's generated ids per prompt, without the stop token or sequence.
    """
    if not prompts:
        return []
    seqs = check_stop_sequences(stop_sequences)
    if num_beams < 1:
        raise ValueError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    device = next(model.parameters()).device
    bsz, k = len(prompts), num_beams
    tokens, padding, plen = left_pad(prompts, pad_id, max_new_tokens, device)
    total = plen + max_new_tokens
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
    input_pos = get_position_ids_from_padding_mask(padding)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device).repeat_interleave(k)  # [b*k]: the sample of each beam
    b_idx = torch.arange(bsz, device=device)[:, None]

    decoder = getattr(model, "decoder", model)
    if use_cache:
        if decoder.caches_are_setup():
            decoder.reset_caches()
        with device:  # torchtune's KVCache allocates on the default device
            decoder.setup_caches(bsz, next(decoder.parameters()).dtype, decoder_max_seq_len=total)
    last = torch.zeros((bsz, plen), dtype=torch.bool, device=device)
    last[:, -1] = True  # prefill: logits at the last prompt position only
    try:
        with output_at(decoder, last):
            # one prefill per sample: the images go through the encoder once, not once per beam
            logits = model_forward(
                model,
                tokens[:, :plen],
                images=images,
                image_counts=image_counts,
                mask=masks[:, :plen] if use_cache else masks[:, :plen, :plen],
                input_pos=input_pos[:, :plen],
            )
        logits = logits[:, -1] if logits.dim() == 3 else logits
        vocab = logits.shape[-1]
        n_cand = min(max(2, 1 + len(stop) + len(seqs)) * k, k * vocab)
        top_beams = torch.arange(n_cand, device=device) < k  # only these may finish
        if use_cache:
            for kv in _kv_caches(decoder):  # [b, h, s, d] -> [b*k, h, s, d], beam-major per sample
                kv.k_cache = kv.k_cache.repeat_interleave(k, dim=0)
                kv.v_cache = kv.v_cache.repeat_interleave(k, dim=0)
                kv.batch_size = bsz * k
        else:
            beam_images, beam_counts = _beam_images(images, image_counts, rows)
        masks, input_pos, prompt_ids = masks[rows], input_pos[rows], tokens[rows, :plen]
        seen = seen_tokens(prompts, vocab, device)[rows] if repetition_penalty != 1.0 else None
        logits = logits[rows]  # the k beams of a sample start identical; only beam 0 counts
        run_scores = torch.zeros((bsz, k), device=device)
        run_scores[:, 1:] = _NEG
        run_seqs = torch.full((bsz, k, max_new_tokens), pad_id, dtype=torch.long, device=device)
        fin_seqs = run_seqs.clone()
        fin_scores = torch.full((bsz, k), _NEG, device=device)
        fin_flag = torch.zeros((bsz, k), dtype=torch.bool, device=device)
        fin_len = torch.zeros((bsz, k), dtype=torch.long, device=device)
        fin_cut = torch.zeros((bsz, k), dtype=torch.long, device=device)  # stop ids at the end
        open_ = torch.ones((bsz, 1), dtype=torch.bool, device=device)  # may still improve

        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)  # [b*k, v]
            if seen is not None:
                logp = penalize_repeats(logp, seen, repetition_penalty)
            if t < min_new_tokens:
                logp = block_tokens(logp, stop)
            acc = (logp.view(bsz, k, vocab) + run_scores[..., None]).view(bsz, k * vocab)
            top_s, top_i = torch.topk(acc, n_cand, dim=-1)  # [b, C], best first
            if sync_next is not None:
                top_i, top_s = sync_next(top_i), sync_next(top_s)
            src, tok = top_i // vocab, top_i % vocab
            cand = run_seqs.gather(1, src[..., None].expand(-1, -1, max_new_tokens)).clone()
            cand[:, :, t] = tok
            cut = torch.isin(tok, stop).long()  # [b, C]: stop ids to drop from the output
            if seqs and t >= min_new_tokens:
                cut = torch.maximum(cut, stop_sequence_ends(cand, t, seqs))
            ends = (cut > 0) | (t + 1 == max_new_tokens)

            # finished hypotheses: keep the best k of the old ones and the top-k that just ended
            new_fin = ends & top_beams
            f_s = top_s / ((t + 1) ** length_penalty)
            f_s = f_s + (~open_).float() * _NEG + (~new_fin).float() * _NEG
            pick = torch.topk(torch.cat((fin_scores, f_s), 1), k, dim=-1).indices
            fin_scores = torch.cat((fin_scores, f_s), 1).gather(1, pick)
            fin_flag = torch.cat((fin_flag, new_fin), 1).gather(1, pick)
            fin_len = torch.cat((fin_len, torch.full_like(tok, t + 1)), 1).gather(1, pick)
            fin_cut = torch.cat((fin_cut, cut), 1).gather(1, pick)
            both = torch.cat((fin_seqs, cand), 1)
            fin_seqs = both.gather(1, pick[..., None].expand(-1, -1, max_new_tokens))

            # running beams: the best k continuations that did not end
            r_s = top_s + ends.float() * _NEG
            keep = torch.topk(r_s, k, dim=-1).indices
            run_scores = r_s.gather(1, keep)
            src, tok = src.gather(1, keep), tok.gather(1, keep)
            run_seqs = cand.gather(1, keep[..., None].expand(-1, -1, max_new_tokens))

            best = run_scores[:, :1] / ((t + 1) ** length_penalty)
            worst = torch.where(fin_flag, fin_scores.min(1, keepdim=True).values, _NEG)
            open_ = open_ & (best > worst).any(-1, keepdim=True)
            if not bool(open_.any()) or bool(ends.all()):
                break

            flat = (b_idx * k + src).flatten()  # [b*k] source row of each new beam
            new = tok.flatten()
            if seen is not None:
                seen = seen[flat]
                seen[torch.arange(bsz * k, device=device), new] = True
            pos = plen + t
            if use_cache:
                for kv in _kv_caches(decoder):
                    kv.k_cache.copy_(kv.k_cache.index_select(0, flat))
                    kv.v_cache.copy_(kv.v_cache.index_select(0, flat))
                logits = model_forward(
                    model,
                    new[:, None],
                    images=None,
                    image_counts=None,
                    mask=masks[:, pos : pos + 1],
                    input_pos=input_pos[:, pos : pos + 1],
                )
            else:
                seq = torch.cat((prompt_ids, run_seqs.view(bsz * k, -1)[:, : t + 1]), 1)
                logits = model_forward(
                    model,
                    seq,
                    images=beam_images,
                    image_counts=beam_counts,
                    mask=masks[:, : pos + 1, : pos + 1],
                    input_pos=input_pos[:, : pos + 1],
                )
            logits = logits[:, -1]
    finally:
        if use_cache:
            teardown_caches(decoder)

    return [fin_seqs[i, 0, : int(fin_len[i, 0] - fin_cut[i, 0])].tolist() for i in range(bsz)]
