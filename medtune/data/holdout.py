"""Hold out a seeded fraction of a split *by image*, for data sets without a validation split.

VQA-RAD ships train and test only; choosing a checkpoint on test is not allowed, so the configs
take a validation set out of train. Questions about one image are strongly correlated, so the cut
is made between images, never between questions of one image: no image (file) is on both sides.

    train = vqa_rad(root, "train", holdout_fraction=0.1, holdout_seed=0, holdout_split="train")
    val = vqa_rad(root, "train", holdout_fraction=0.1, holdout_seed=0, holdout_split="validation")

Rule (deterministic given the samples and the seed, independent of where the data lives):

1. samples are grouped by image: two samples sharing any image are in one group (a sample without
   images is a group of its own, keyed by its id);
2. each group is named by its images' paths relative to the common folder of all images (so the
   same release gives the same split on every machine), and the sorted names are shuffled with
   ``random.Random(seed)``;
3. the first ``round(fraction * n_groups)`` groups (at least one, at most ``n_groups - 1``) are the
   held-out side; the rest stay. Within each side samples keep the reader's order.

So ``fraction`` is a fraction of *images*; the two sides' question counts add up to the input's.
Held-out samples get ``meta["split"] = "validation"`` and ``meta["holdout_of"]`` = their split.
Every reader accepts ``holdout_fraction``, ``holdout_seed`` and ``holdout_split`` through
:func:`holdout_option`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from medtune.data.errors import BadValueError
from medtune.data.rows import Samples
from medtune.data.sample import Sample

__all__ = ["HOLDOUT_SPLITS", "holdout", "holdout_groups", "holdout_option"]

#: ``holdout_split`` values: the samples that stay, or the held-out ones.
HOLDOUT_SPLITS = ("train", "validation")


def holdout_groups(samples: Sequence[Sample]) -> list[tuple[str, list[int]]]:
    """Samples grouped by shared images: ``[(group name, [sample indices])]``, sorted by name."""
    paths = sorted({os.path.abspath(p) for s in samples for p in s.image_paths})
    root = os.path.dirname(os.path.commonprefix(paths)) if paths else ""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, s in enumerate(samples):
        for p in s.image_paths:
            key = os.path.abspath(p)
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(find(i), []).append(i)
    groups = []
    for idx in members.values():
        images = sorted(
            {os.path.relpath(os.path.abspath(p), root) for i in idx for p in samples[i].image_paths}
        )
        name = "|".join(images) if images else f"id:{samples[idx[0]].id}"
        groups.append((name, idx))
    return sorted(groups)


def holdout(
    samples: Sequence[Sample], fraction: float, seed: int = 0, split: str = "train"
) -> Samples:
    """One side of a seeded by-image hold-out of ``samples`` (see the module docstring).

    Args:
        samples: a reader's output (one split).
        fraction: share of the images to hold out, in (0, 1).
        seed: shuffles the images; the same seed gives the same cut.
        split: ``"train"`` (what stays) or ``"validation"`` (what is held out).

    Returns:
        The chosen side, as :class:`~medtune.data.rows.Samples` (keeps the reader's skip counts).

    Raises:
        BadValueError: ``fraction`` outside (0, 1), an unknown ``split``, or fewer than two images.
    """
    if split not in HOLDOUT_SPLITS:
        raise BadValueError(f"holdout_split: expected one of {HOLDOUT_SPLITS}, got {split!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise BadValueError(f"holdout_fraction: expected a number in (0, 1), got {fraction!r}")
    groups = holdout_groups(samples)
    source = getattr(samples, "source", "")
    if len(groups) < 2:
        raise BadValueError(
            f"{source or 'samples'}: cannot hold out part of {len(groups)} image group(s)"
        )
    order = [name for name, _ in groups]
    random.Random(seed).shuffle(order)
    n_out = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    held = set(order[:n_out])
    chosen = sorted(
        i for name, idx in groups if (name in held) == (split == "validation") for i in idx
    )
    out = [samples[i] for i in chosen]
    if split == "validation":
        out = [
            dataclasses.replace(
                s, meta={**s.meta, "split": "validation", "holdout_of": s.meta.get("split")}
            )
            for s in out
        ]
    return Samples(
        out,
        source=f"{source} holdout {split} ({fraction:g} of images, seed {seed})",
        skipped=getattr(samples, "skipped", None),
        errors=getattr(samples, "errors", None),
    )


def holdout_option(reader: Callable[..., Any]) -> Callable[..., Any]:
    """Give a reader the keyword arguments ``holdout_fraction`` (None: off), ``holdout_seed`` (0)
    and ``holdout_split`` ("train"), applied to its output with :func:`holdout`.

    The reader's signature gains the three keywords (so config checks that bind arguments see them).
    """

    @functools.wraps(reader)
    def wrapper(
        *args: Any,
        holdout_fraction: float | None = None,
        holdout_seed: int = 0,
        holdout_split: str = "train",
        **kwargs: Any,
    ):
        samples = reader(*args, **kwargs)
        if holdout_fraction is None:
            return samples
        return holdout(samples, holdout_fraction, holdout_seed, holdout_split)

    sig = inspect.signature(reader)
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
        for n, d in (("holdout_fraction", None), ("holdout_seed", 0), ("holdout_split", "train"))
    ]
    params = list(sig.parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = sig.replace(parameters=head + extra + tail)
    wrapper.__doc__ = (reader.__doc__ or "") + (
        "\n\n    Hold-out (:func:`medtune.data.holdout.holdout`): ``holdout_fraction``,"
        " ``holdout_seed`` and ``holdout_split`` keep one side of a seeded by-image cut.\n"
    )
    return wrapper
