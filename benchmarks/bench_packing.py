#!/usr/bin/env python
"""Training tokens/s on report-like data: packed vs padded vs length-grouped batches.

Data: ``--samples`` synthetic report samples, each [bos, 32 image placeholders, a 12-token
question, a report of 20 to 250 tokens drawn skewed short (exponential clipped at 250, mean ~71: most
reports short, a long tail)], one 32-px image each. Model: a random MedVLM
(:func:`medtune.testing.packing.random_medvlm`: timm ViT, pooled embedding unfolded to 32 image
tokens, Llama-3 decoder at ``--width`` / ``--layers``), set up as ``vision_finetune``: encoder and
connector trained in fp32, LLM frozen, AdamW. One step = forward, summed answer-token
cross-entropy (:func:`medtune.training.loss.answer_loss_sum`), backward, optimizer step.

Three batchings of the same samples:

- ``padded``: random batches of ``--batch-size`` samples, right-padded to the longest
  (:func:`medtune.data.collate.collate_vision_chat`).
- ``grouped``: :class:`medtune.data.sampling.LengthGroupedBatchSampler` (``group_by_length``),
  same batch size and collate.
- ``packed``: :class:`medtune.data.packing.PackedDataset` packs of ``--max-seq-len`` tokens,
  ``--packs`` rows per batch (default: as many rows as hold about ``--batch-size`` samples on
  average), :func:`medtune.data.packing.collate_packed` with the block-causal mask and restarting
  positions.

Throughput counts only non-padding tokens (image placeholders, question, answer). The set-ups run
round-robin (rotated each repetition) so load drift on a shared machine hits all three alike;
tokens/s is total non-padding tokens over total time per set-up. Also printed: the padding share of
each batching over the whole epoch (computed from the lengths, no model).

Usage::

    python benchmarks/bench_packing.py                  # width 256, 4 layers, ~1-2 min on 2 cores
    python benchmarks/bench_packing.py --tiny           # smoke test, seconds

Prints per set-up ``<name>  <tokens/s> tok/s  (<padding>% padding)`` and the ratio lines
``packed/padded = X.XXx`` and ``grouped/padded = Y.YYx``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtune.data.collate import collate_vision_chat  # noqa: E402
from medtune.data.packing import (  # noqa: E402
    PackedDataset,
    attention_mask,
    collate_packed,
)
from medtune.data.sampling import LengthGroupedBatchSampler  # noqa: E402
from medtune.testing.packing import random_medvlm, report_lengths, synthetic_item  # noqa: E402
from medtune.training.loss import answer_loss_sum  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded/grouped batch")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--packs", type=int, default=None, help="packed rows per batch")
    p.add_argument("--steps", type=int, default=6, help="timed steps per set-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per set-up")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="base vocabulary (+256 specials)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.width, args.layers, args.vocab = 48, 32, 1, 256
        args.steps, args.warmup, args.batch_size = 2, 1, 4
    return args


def batchings(items, lengths, args) -> dict[str, list[dict]]:
    """name -> the epoch's batches (collated), for padded, grouped and packed."""
    n, bs = len(items), args.batch_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    padded = [perm[k : k + bs] for k in range(0, n, bs)]
    grouped = list(LengthGroupedBatchSampler(lengths, bs, seed=args.seed))
    packed_ds = PackedDataset(items, args.max_seq_len, lengths=lengths, seed=args.seed)
    rows = args.packs or max(1, round(bs * sum(lengths) / n / args.max_seq_len))
    order = torch.randperm(len(packed_ds), generator=torch.Generator().manual_seed(1)).tolist()
    packed = [order[k : k + rows] for k in range(0, len(order), rows)]
    return {
        "padded": [collate_vision_chat([items[i] for i in b], pad_id=0) for b in padded],
        "grouped": [collate_vision_chat([items[i] for i in b], pad_id=0) for b in grouped],
        "packed": [
            collate_packed([packed_ds[p] for p in b], pad_id=0, seq_len=args.max_seq_len)
            for b in packed
        ],
    }


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    threads = args.threads or min(8, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    model = random_medvlm(
        width=args.width,
        layers=args.layers,
        heads=max(1, args.width // 64),
        kv_heads=max(1, args.width // 256),
        intermediate=int(3.5 * args.width),
        vocab_base=args.vocab,
        enc_width=max(32, args.width // 4),
        enc_depth=2,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    ).to(device)
    model.decoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    answers = report_lengths(args.samples, seed=args.seed)
    items = [synthetic_item(model, i, answer_len=a, seed=args.seed) for i, a in enumerate(answers)]
    lengths = [len(x["tokens"]) for x in items]
    print(
        f"torch {torch.__version__} | {device} | {torch.get_num_threads()} threads | "
        f"load(1 min) {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: Llama-3 width {args.width} x {args.layers} layers (frozen), vocab "
        f"{args.vocab + 256}; ViT + pooled_unfold -> {model.tokens_per_image} image tokens (trained)"
    )
    print(
        f"data: {len(items)} samples, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}); answers {min(answers)}-{max(answers)} "
        f"(mean {sum(answers) / len(answers):.0f})"
    )
    sets = batchings(items, lengths, args)
    waste = {}
    for name, batches in sets.items():
        total = sum(b["tokens"].numel() for b in batches)
        waste[name] = 1 - sum(lengths) / total
        shape = "x".join(str(d) for d in batches[0]["tokens"].shape)
        print(
            f"{name}: {len(batches)} batches per epoch (first {shape}), {waste[name]:.0%} padding"
        )

    def step(batch) -> int:
        tokens = batch["tokens"].to(device)
        kw = {}
        if "seq_lens" in batch:
            kw = {"mask": attention_mask(batch, device), "input_pos": batch["input_pos"].to(device)}
        images = {k: v.to(device) for k, v in batch["images"].items()}

        def forward():
            return model(tokens, images=images, image_counts=batch["image_counts"], **kw)

        loss, n = answer_loss_sum(
            forward, model.decoder, batch["labels"].to(device), autocast=device.type == "cuda"
        )
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(n)

    names = list(sets)
    by_id = {x["id"]: n for x, n in zip(items, lengths)}
    seen = {k: 0 for k in names}
    for name in names:
        for _ in range(args.warmup):
            step(sets[name][seen[name] % len(sets[name])])
            seen[name] += 1
    spent = {k: 0.0 for k in names}
    cpu = {k: 0.0 for k in names}  # process CPU time: steadier than wall time on a shared machine
    toks = {k: 0 for k in names}
    for r in range(args.steps):
        for name in names[r % 3 :] + names[: r % 3]:
            batch = sets[name][seen[name] % len(sets[name])]
            seen[name] += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            toks[name] += sum(by_id[i] for i in batch["ids"])  # non-padding tokens
    rate = {k: toks[k] / spent[k] for k in names}
    for k in names:
        print(
            f"{k:8s} {rate[k]:10.0f} tok/s  ({waste[k]:.0%} padding, {spent[k]:.1f} s, "
            f"{cpu[k]:.1f} s CPU)"
        )
    print(f"packed/padded = {rate['packed'] / rate['padded']:.2f}x")
    print(f"grouped/padded = {rate['grouped'] / rate['padded']:.2f}x")
    if device.type == "cpu":  # the same ratios from CPU time (all threads), for a loaded machine
        per_cpu = {k: toks[k] / max(cpu[k], 1e-9) for k in names}
        print(
            f"(from process CPU time: packed/padded {per_cpu['packed'] / per_cpu['padded']:.2f}x, "
            f"grouped/padded {per_cpu['grouped'] / per_cpu['padded']:.2f}x)"
        )
    return rate


if __name__ == "__main__":
    main()
