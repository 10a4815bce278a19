"""Batched, KV-cached generation for MedVLM and plain Llama-3 decoders.

Prompts are token ids (built with the real chat special tokens, image placeholders included) and
stay ids: nothing is decoded and re-encoded. A batch is left-padded; each row gets its own
position ids (starting at 0 at its first real token) and a causal mask that hides the padding, so
a prompt generates the same tokens alone or in a batch. Image embeddings enter once, at prefill;
decode steps feed one token per row through the KV cache.

Sampling: greedy (``temperature=0``), or temperature with optional top-k and top-p (nucleus);
``num_beams > 1`` runs :func:`medtune.beam_search.beam_search` instead. ``repetition_penalty``
(CTRL/HF rule) and ``min_new_tokens`` act on the logits before sampling, as HF's logits processors.
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
from medtune.utils.errors import ConfigError


@dataclass
class GenerationConfig:
    """Settings recorded with every prediction (see DESIGN §3 "Predictions JSONL").

    ``num_beams`` 1 is greedy/sampling; above 1, beam search with ``length_penalty`` (finished
    hypotheses score ``sum logprob / n_tokens ** length_penalty``, HF/LAVIS). ``repetition_penalty``
    1.0 is off; ``min_new_tokens`` blocks the stop tokens until that many are generated.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    use_cache: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        # one clear line naming the key: these come from a config's ``generation`` block
        def bad(key: str, want: str) -> ConfigError:
            return ConfigError(f"generation.{key}: expected {want}, got {getattr(self, key)!r}")

        for key in ("max_new_tokens", "num_beams", "min_new_tokens", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, "an integer")
        for key in ("temperature", "length_penalty", "repetition_penalty"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(key, "a number")
        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"an integer in 0..max_new_tokens ({self.max_new_tokens})")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1.0: no penalty)")
        if self.num_beams > 1 and self.temperature > 0:
            raise bad(
                "num_beams", "1 when sampling (temperature > 0): beam search is deterministic"
            )

    @classmethod
    def from_config(cls, block) -> GenerationConfig:
        """Build from a config's ``generation`` mapping, naming an unknown key."""
        block = dict(block or {})
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"generation.{unknown[0]}: unknown key; expected one of "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**block)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int, device):
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
            new token this step (not a stop token) and those tokens, for streaming. Beam search
            knows its tokens only at the end: the calls then come after the search, one per position.
        num_beams: > 1 runs :func:`medtune.beam_search.beam_search` (greedy, ``length_penalty``).
        length_penalty: beam search only: finished scores are ``sum logprob / n ** length_penalty``.
        repetition_penalty: CTRL/HF penalty on ids already in the row (prompt included); 1.0: off.
        min_new_tokens: the stop tokens are blocked until this many tokens are generated.

    Returns:
        Generated ids per prompt, without the prompt and without the stop token.
    """
    if not prompts:
        return []
    if num_beams > 1:
        return _beam(
            model,
            prompts,
            temperature=temperature,
            on_step=on_step,
            pad_id=pad_id,
            stop_tokens=stop_tokens,
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
    tokens, padding, plen = _left_pad(prompts, pad_id, max_new_tokens, device)
    total = plen + max_new_tokens
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
            if on_step is not None and new_rows:
                on_step(new_rows, [out[i][-1] for i in new_rows])
            done |= is_stop
            if seen is not None:
                seen[torch.arange(bsz, device=device), nxt] = True
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


def _beam(model, prompts, *, temperature: float, on_step, **kwargs) -> list[list[int]]:
    """``generate`` with ``num_beams > 1``: beam search, then ``on_step`` once per position."""
    from medtune.beam_search import beam_search  # it builds on this module's helpers

    if temperature > 0:
        raise ValueError("generate: beam search (num_beams > 1) does not sample: set temperature 0")
    out = beam_search(model, prompts, **kwargs)
    for j in range(max(map(len, out), default=0)) if on_step is not None else ():
        rows = [i for i, o in enumerate(out) if len(o) > j]
        on_step(rows, [out[i][j] for i in rows])
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
