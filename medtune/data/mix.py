"""Mix several datasets with sampling weights into one list.

Sizing rule (deterministic given ``seed``):

- ``weights=None``: every sample of every source once (plain concatenation), then shuffled.
- with weights: the output has ``size`` samples (default: the total number of source samples,
  ``N = sum(len(s))``), and source ``i`` contributes ``n_i = size * w_i / sum(w)`` of them,
  rounded by largest remainder so that the ``n_i`` add up to exactly ``size``. A source with
  ``n_i <= len_i`` gives a random subset of ``n_i`` samples without replacement; one with
  ``n_i > len_i`` is repeated whole ``n_i // len_i`` times plus a random subset of
  ``n_i % len_i`` (oversampling: repeated samples are the same objects, same ids). The
  result is shuffled.

Example: sources of 100 and 10 samples with weights ``[1, 1]`` give 110 samples, 55 from each:
55 of the 100, and the 10 repeated 5 times plus 5 more.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from medtune.data.sample import Sample

__all__ = ["mix", "mix_counts"]


def mix_counts(
    lengths: Sequence[int], weights: Sequence[float] | None, size: int | None = None
) -> list[int]:
    """How many samples each source contributes (see the module docstring).

    Args:
        lengths: number of samples per source.
        weights: relative sampling proportions (>= 0, not all 0), or None for "each sample once".
        size: total output size (default ``sum(lengths)``).

    Returns:
        Per-source counts summing to ``size`` (or to ``sum(lengths)`` when ``weights`` is None).

    Raises:
        ValueError: weights of the wrong length, negative, all zero, or a positive weight on an
            empty source.
    """
    lengths = [int(n) for n in lengths]
    if weights is None:
        if size is not None:
            raise ValueError("mix: size needs weights")
        return lengths
    weights = [float(w) for w in weights]
    if len(weights) != len(lengths):
        raise ValueError(f"mix: {len(weights)} weights for {len(lengths)} sources")
    if any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix: weights must be >= 0 and not all 0, got {weights}")
    for i, (n, w) in enumerate(zip(lengths, weights)):
        if w > 0 and n == 0:
            raise ValueError(f"mix: source {i} is empty but has weight {w}")
    total = sum(lengths) if size is None else int(size)
    if total < 0:
        raise ValueError(f"mix: size must be >= 0, got {size}")
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(
    sources: Sequence[Sequence[Sample]],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    *,
    size: int | None = None,
) -> list[Sample]:
    """Mix datasets by weight (sizing rule in the module docstring).

    Args:
        sources: lists of samples (e.g. reader outputs).
        weights: relative sampling proportions, one per source; None = concatenate.
        seed: seed for subset choice and the final shuffle.
        size: output size with weights (default: total number of source samples).

    Returns:
        A new shuffled ``list[Sample]``.
    """
    sources = [list(s) for s in sources]
    counts = mix_counts([len(s) for s in sources], weights, size)
    rng = random.Random(seed)
    out: list[Sample] = []
    for src, n in zip(sources, counts):
        if n == 0:
            continue
        whole, rest = divmod(n, len(src))
        out.extend(src * whole)
        out.extend(rng.sample(src, rest))
    rng.shuffle(out)
    return out


def drop_images(source: list | dict) -> list[Sample]:
    """Text-only copies of samples: no images, ``<image>`` markers removed (text-only SFT of the
    LLM on a VQA set, or a question-only baseline).

    Args:
        source: samples, or the config of any medtune reader (a nested ``_component_``: torchtune
            0.6.1 does not instantiate nested components, so this does).

    Returns:
        New :class:`~medtune.data.sample.Sample` objects with ``images=[]``.
    """
    import dataclasses

    from medtune.data.sample import IMAGE_MARKER

    if isinstance(source, dict) or hasattr(source, "_content"):
        from omegaconf import OmegaConf
        from torchtune import config

        source = config.instantiate(OmegaConf.create(source))
    out = []
    for s in source:
        msgs = [
            dataclasses.replace(m, content=m.content.replace(IMAGE_MARKER, "").strip())
            for m in s.messages
        ]
        out.append(dataclasses.replace(s, images=[], messages=msgs))
    return out
