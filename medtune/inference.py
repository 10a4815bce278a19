"""Samples -> answers: the one inference path (eval, generate, the demo, the local judge, serve).

:func:`answer` encodes each sample with the model transform (``inference=True``: the ids end with
an open assistant header), groups them in batches of ``batch_size`` in the order given, runs
:func:`medtune.generation.generate` (batched, KV-cached, images at prefill only) and decodes.

Data-parallel under torchrun: when a process group with more than one rank is initialised, batch
``k`` runs on rank ``k % world_size`` and the answers are gathered with
``torch.distributed.all_gather_object``, so every rank returns the full list. The batches are the
ones a single process would form, and sampling draws from a generator seeded per batch by
``(settings.seed, k)``, so the result equals a 1-process run: same ids, same answers, same order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from medtune.generation import GenerationConfig, generate
from medtune.utils.distributed import world as dist_world

__all__ = ["Answer", "answer"]


@dataclass
class Answer:
    """One sample's answer.

    Attributes:
        id: the sample's id.
        text: the decoded answer (special tokens dropped, surrounding whitespace stripped).
        token_ids: the generated ids, without the stop token.
        prompt_tokens: length of the prompt in tokens (image placeholders included).
        finish_reason: ``"stop"`` (a stop token ended it) or ``"length"`` (``max_new_tokens``).
    """

    id: Any
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_seed(seed: int, batch: int) -> int:
    return hash((int(seed), int(batch))) & 0x7FFF_FFFF_FFFF_FFFF


_GENERATE_ARGS = set(inspect.signature(generate).parameters)


def _decoding_kwargs(settings: GenerationConfig) -> dict[str, Any]:
    """The settings as :func:`generate` keyword arguments (every field but ``seed``)."""
    kwargs = {k: v for k, v in settings.to_dict().items() if k != "seed"}
    defaults = GenerationConfig().to_dict()
    unsupported = [k for k in kwargs if k not in _GENERATE_ARGS and kwargs[k] != defaults[k]]
    if unsupported:
        raise NotImplementedError(f"generate() does not take {unsupported}")
    return {k: v for k, v in kwargs.items() if k in _GENERATE_ARGS}


def answer(
    model: nn.Module,
    transform: Callable[..., dict[str, Any]],
    samples: Sequence[Any],
    settings: GenerationConfig,
    *,
    tokenizer: Any,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_tokens: Callable[[list[int], list[int]], None] | None = None,
    data_parallel: bool | None = None,
    sync_next: Callable[[torch.Tensor], torch.Tensor] | None = None,
    first_batch: int = 0,
) -> list[Answer]:
    """Answer every sample, in batches; the answers come back in the order of ``samples``.

    Args:
        model: a MedVLM or a bare torchtune decoder, in eval mode.
        transform: the model transform (:class:`medtune.data.model_transform.MedVLMTransform`), called
            as ``transform(sample, inference=True, index=i)``; a sample's last assistant turn, if
            any, is left out of the prompt.
        samples: the samples (:class:`medtune.data.sample.Sample`).
        settings: decoding settings; ``seed`` seeds a generator per batch (sampling only).
        tokenizer: for ``pad_id``, ``stop_tokens`` (and ``stop_sequences`` where it has them)
            and decoding.
        batch_size: samples per :func:`generate` call.
        device: where the images go (default: the model's device).
        progress: show a progress bar on rank 0 (``TQDM_DISABLE=1`` turns it off).
        on_tokens: called after each decoding step with ``(indices, token_ids)``: positions in
            ``samples`` and the new token of each (streaming); on the rank that runs the batch.
        data_parallel: split the batches over the ranks of an initialised process group
            (None: when there is one). False for a model sharded over the ranks (FSDP), where
            every rank must run every batch.
        sync_next: passed to :func:`generate` (a sharded model's per-step token broadcast).
        first_batch: number of the first batch, for a caller that answers a long list in pieces
            of ``batch_size * world_size`` samples (to write as it goes): batch seeds (and which
            rank runs a batch) then stay those of one call over the whole list.

    Returns:
        One :class:`Answer` per sample, on every rank.
    """
    samples = list(samples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    decoding = _decoding_kwargs(settings)
    rank, world = (0, 1) if data_parallel is False else dist_world()
    starts = list(range(0, len(samples), batch_size))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="answer", unit="q")  # no disable=: TQDM_DISABLE works
    local: dict[int, list[Answer]] = {}
    try:
        for k in range((rank - first_batch) % world, len(starts), world):
            idx = list(range(starts[k], min(starts[k] + batch_size, len(samples))))
            items = [transform(samples[i], inference=True, index=i) for i in idx]
            counts = [int(it["n_images"]) for it in items]
            images = None
            if sum(counts) and items[0]["images"]:
                images = {
                    name: torch.cat([it["images"][name] for it in items]).to(device)
                    for name in items[0]["images"]
                }
            generator = None
            if settings.temperature > 0:
                generator = torch.Generator(device=device).manual_seed(
                    _batch_seed(settings.seed, first_batch + k)
                )
            hook = None
            if on_tokens is not None:

                def hook(rows: list[int], ids: list[int], idx: list[int] = idx) -> None:
                    on_tokens([idx[r] for r in rows], ids)

            outs = generate(
                model,
                [it["tokens"] for it in items],
                pad_id=tokenizer.pad_id,
                stop_tokens=tokenizer.stop_tokens,
                stop_sequences=getattr(tokenizer, "stop_sequences", ()),  # e.g. MiniGPT-4's ###
                images=images,
                image_counts=torch.tensor(counts) if images is not None else None,
                generator=generator,
                sync_next=sync_next,
                on_step=hook,
                **decoding,
            )
            local[k] = [
                Answer(
                    id=it["id"],
                    text=tokenizer.decode(ids).strip(),
                    token_ids=list(ids),
                    prompt_tokens=len(it["tokens"]),
                    finish_reason="length" if len(ids) >= settings.max_new_tokens else "stop",
                )
                for it, ids in zip(items, outs)
            ]
            if bar is not None:
                bar.update(len(idx) * world)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        import torch.distributed as dist

        parts: list[dict[int, list[Answer]] | None] = [None] * world
        dist.all_gather_object(parts, local)
        for part in parts:
            local.update(part or {})
    return [a for k in range(len(starts)) for a in local[k]]
