"""Sequence packing for MedVLM training: several samples, with their images, in one row.

With a 32-token image prefix and reports of 20 to 250 tokens, right-padding a batch to its
longest sample wastes most of it. Packing concatenates samples up to ``max_seq_len`` tokens per
row; attention is block-diagonal causal (a sample sees only its own earlier tokens), positions
restart at 0 per sample, and no target crosses from one sample into the next, so the summed
answer-token loss of a packed batch equals the unpacked batch's (up to float reordering).

Pieces:

- :func:`pack_indices`: greedy first-fit of sample lengths into packs (deterministic by seed).
- :class:`PackedDataset`: wraps a dataset of items (``tokens``, ``labels``, ``images``,
  ``n_images``, ``id``); item ``p`` is the list of items of pack ``p``. The packs are fixed when
  the dataset is built (as torchtune's ``PackedDataset``); a ``DistributedSampler`` over the packs
  shuffles them per (seed, epoch) and resumes by skipping batches, exactly as for unpacked data.
- :func:`collate_packed`: packs -> ``tokens``, ``labels``, ``input_pos``, ``mask`` (dense bool
  [b, S, S]), ``seq_lens``, ``images``, ``image_counts`` (images per row), ``ids``.
- :func:`attention_mask`: the batch's mask for the model's device: a flex-attention ``BlockMask``
  (torchtune's ``packed_block_causal_mask``) on CUDA where torch supports flex attention, the
  dense bool mask elsewhere.

MedVLM's placeholder scatter fills placeholders row-major (row by row, left to right), so the
images concatenated row by row, sample by sample, land in their own samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medtune.data.errors import DataError

IGNORE_INDEX = -100


def token_lengths(dataset, epoch: int = 0) -> list[int]:
    """Token count of every item of ``dataset``, without loading images where possible.

    Uses the dataset's transform (``transform.prepare`` / ``transform.encode``, as in
    :class:`medtune.data.model_transform.VisionChatDataset`); any other dataset is indexed (which
    loads its images: slower, same result).

    Args:
        dataset: a map-style dataset of items with ``tokens``.
        epoch: the epoch whose prompt templates to use (templates may be sampled per epoch).
    """
    tf = getattr(dataset, "transform", None)
    samples = getattr(dataset, "samples", None)
    if samples is not None and hasattr(tf, "prepare") and hasattr(tf, "encode"):
        return [
            len(tf.encode(tf.prepare(s, epoch=epoch, index=i))[0]) for i, s in enumerate(samples)
        ]
    return [len(dataset[i]["tokens"]) for i in range(len(dataset))]


def pack_indices(
    lengths: Sequence[int],
    max_seq_len: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    open_packs: int = 64,
) -> list[list[int]]:
    """Greedy first-fit packing of samples into packs of at most ``max_seq_len`` tokens.

    Samples are visited in a random order (``seed``) or in index order, and each goes into the
    first of the last ``open_packs`` packs with room for it (a new pack when none has room). The
    window keeps packing linear in the number of samples; 64 open packs fill packs nearly as well
    as unbounded first-fit on report-like lengths.

    Args:
        lengths: token count per sample.
        max_seq_len: tokens per pack.
        seed: order of the visit (with ``shuffle``).
        shuffle: visit in a random order (False: index order, which keeps packs contiguous).
        open_packs: how many recent packs stay open for later samples.

    Returns:
        packs: lists of sample indices, each in visit order.

    Raises:
        DataError: a sample longer than ``max_seq_len`` (naming its index).
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be > 0, got {max_seq_len}")
    n = len(lengths)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n))
    packs: list[list[int]] = []
    room: list[int] = []  # free tokens of each pack
    first_open = 0
    for i in order:
        length = int(lengths[i])
        if length > max_seq_len:
            raise DataError(
                f"sample {i}: {length} tokens do not fit in a pack of max_seq_len={max_seq_len} "
                "(raise max_seq_len or shorten the sample)",
                reason="too long",
            )
        for p in range(first_open, len(packs)):
            if room[p] >= length:
                packs[p].append(i)
                room[p] -= length
                break
        else:
            packs.append([i])
            room.append(max_seq_len - length)
            first_open = max(0, len(packs) - open_packs)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of packs: item ``p`` is the list of the underlying items in pack ``p``.

    Args:
        dataset: the items (``tokens``, ``labels``, ``images``, ``n_images``, ``id``).
        max_seq_len: tokens per pack.
        lengths: token count per item (default: :func:`token_lengths`).
        seed: the packing order (packs are fixed for the run; shuffle the packs per epoch with
            the sampler).
        shuffle: pack samples in a random order (False: in index order).

    ``set_epoch`` is passed to the underlying dataset (template sampling, augmentation). When a
    template sampled in a later epoch makes a pack longer than ``max_seq_len``, the collate pads
    that batch to its longest row instead: nothing is cut.
    """

    def __init__(
        self,
        dataset,
        max_seq_len: int,
        *,
        lengths: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.dataset = dataset
        self.max_seq_len = int(max_seq_len)
        self.lengths = list(token_lengths(dataset) if lengths is None else lengths)
        if len(self.lengths) != len(dataset):
            raise ValueError(f"{len(self.lengths)} lengths for a dataset of {len(dataset)} items")
        self.packs = pack_indices(self.lengths, self.max_seq_len, seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return len(self.packs)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def fill(self) -> float:
        """Fraction of pack tokens that hold a sample (the rest is padding)."""
        return sum(self.lengths) / max(1, len(self.packs) * self.max_seq_len)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in self.packs[index]]


def _document_ids(seq_lens: list[list[int]], s: int) -> torch.Tensor:
    """[b, s] segment id of every position; each padding position is a segment of its own."""
    doc = torch.empty(len(seq_lens), s, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        doc[r] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return doc


def dense_block_causal_mask(seq_lens: list[list[int]], s: int) -> torch.Tensor:
    """Block-diagonal causal mask, True = attend.

    Equals torchtune's ``create_block_causal_mask`` for the same segment lengths (built from
    segment ids instead of a block-diagonal of triangles, which is slow for many segments).

    Args:
        seq_lens: per row, the segment lengths summing to ``s``.
        s: row length.

    Returns:
        [b, s, s] bool.
    """
    doc = _document_ids(seq_lens, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


def collate_packed(
    packs: list[list[dict[str, Any]]],
    pad_id: int,
    *,
    seq_len: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    dense_mask: bool = True,
) -> dict[str, Any]:
    """Packs -> one batch of packed rows.

    Args:
        packs: per row, the items packed into it (``tokens``, ``labels``, ``images``,
            ``n_images``, ``id``).
        pad_id: padding token id.
        seq_len: pad every row to this length (a fixed shape for compile and flex attention; rows
            longer than it widen the batch rather than being cut). None: the longest row.
        ignore_index: label of positions without a target.
        dense_mask: build the dense [b, S, S] mask (False where :func:`attention_mask` builds a
            BlockMask from ``seq_lens`` on the device instead).

    Returns:
        ``tokens`` [b, S], ``labels`` [b, S] (``ignore_index`` on padding and on the first token of
        every sample, so no target crosses a sample boundary), ``input_pos`` [b, S] (restarting at
        0 per sample, 0 on padding), ``mask`` [b, S, S] bool (True = attend; each padding token
        attends only to itself, so no row is empty), ``seq_lens`` (per row, a [n_seg] long tensor
        of segment lengths, padding as segments of 1, for torchtune's ``packed_block_causal_mask``),
        ``images`` (encoder name -> [n_img_total, 3, H, W], row by row, sample by sample),
        ``image_counts`` [b] (images per row), ``samples_per_row`` [b], ``ids`` (flat, in sample
        order).
    """
    if not packs or any(not p for p in packs):
        raise ValueError("collate_packed needs a non-empty list of non-empty packs")
    rows = [sum(len(x["tokens"]) for x in p) for p in packs]
    s = max(rows) if seq_len is None else max(int(seq_len), max(rows))
    b = len(packs)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), ignore_index, dtype=torch.long)
    input_pos = torch.zeros((b, s), dtype=torch.long)
    seq_lens: list[list[int]] = []
    for r, pack in enumerate(packs):
        at = 0
        lens = []
        for x in pack:
            n = len(x["tokens"])
            tokens[r, at : at + n] = torch.tensor(x["tokens"], dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(x["labels"], dtype=torch.long)
            # the target of a sample's last token would be the next sample's first token
            labels[r, at] = ignore_index
            input_pos[r, at : at + n] = torch.arange(n)
            lens.append(n)
            at += n
        seq_lens.append(lens + [1] * (s - at))
    items = [x for p in packs for x in p]
    images = {name: torch.cat([x["images"][name] for x in items]) for name in items[0]["images"]}
    out = {
        "tokens": tokens,
        "labels": labels,
        "input_pos": input_pos,
        "seq_lens": [torch.tensor(lens, dtype=torch.long) for lens in seq_lens],
        "images": images,
        "image_counts": torch.tensor(
            [sum(x["n_images"] for x in p) for p in packs], dtype=torch.long
        ),
        "samples_per_row": torch.tensor([len(p) for p in packs], dtype=torch.long),
        "ids": [x["id"] for x in items],
    }
    if dense_mask:
        out["mask"] = dense_block_causal_mask(seq_lens, s)
    return out


def flex_available(device: torch.device | str) -> bool:
    """Whether a packed batch on ``device`` gets a flex-attention BlockMask (torchtune's rule:
    torch >= 2.5 and a CUDA device of compute capability >= 7.5)."""
    from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

    return torch.device(device).type == "cuda" and bool(_SUPPORTS_FLEX_ATTENTION)


def attention_mask(batch: dict[str, Any], device: torch.device | str):
    """The attention mask of a packed batch for the model on ``device``.

    Returns:
        a flex-attention ``BlockMask`` built by torchtune's ``packed_block_causal_mask`` on CUDA
        where flex attention is supported (torchtune's attention then runs flex attention), else
        the dense [b, S, S] bool mask on ``device`` (torchtune's attention passes it to SDPA).
    """
    device = torch.device(device)
    if flex_available(device):
        from torchtune.modules.attention_utils import packed_block_causal_mask

        with torch.cuda.device(device):  # torchtune builds the BlockMask on the current device
            return packed_block_causal_mask([x.to(device) for x in batch["seq_lens"]])
    mask = batch.get("mask")
    if mask is None:
        s = batch["tokens"].shape[1]
        mask = dense_block_causal_mask([x.tolist() for x in batch["seq_lens"]], s)
    return mask.to(device)
