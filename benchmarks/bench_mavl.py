#!/usr/bin/env python
"""MAVL throughput on CPU at the real model's shape: pretraining and zero-shot images/s, and the
share of time spent in the query decoder.

Model: :func:`medtune.models.mavl.build_mavl` with MAVL_resnet.yaml's sizes (ResNet-50 cut after
layer3, 224 px, d_model 256, 4 layers x 4 heads, FFN 1024, 75 entities x 9 concepts = 675 queries),
random weights and random books (the frozen BERT runs once at build time and is not timed).

1. ``pretrain``: one step = forward, :class:`~medtune.models.mavl.MAVLLoss` (CE, location, global),
   backward, AdamW; batch B (default 8), images/s.
2. ``zero_shot``: ``model.presence`` under ``no_grad`` in eval mode, images/s.
3. decoder share: wall time inside ``model.decoder`` (forward hooks) over the whole forward, in
   both (the pretraining share counts forward time only).

    python benchmarks/bench_mavl.py [--batch-size 8] [--steps 3] [--threads N] [--tiny]

Prints each measurement and the ratios, all from this one run.
"""

from __future__ import annotations

import argparse
import time

import torch


def _model(tiny: bool):
    from medtune.models.mavl import build_mavl

    if tiny:  # the same code paths at a size that only checks that the script runs
        m = build_mavl(block="basic", blocks=[1, 1, 1], width=4, image_size=64, pool_heads=2, d_model=16,
                       heads=2, num_layers=2, dim_feedforward=32, text_width=8, n_concepts=3)  # fmt: skip
    else:
        m = build_mavl()
    m.set_books(torch.randn_like(m.anatomy_book), torch.randn_like(m.concept_book))
    return m, (64 if tiny else 224)


class _Timer:
    """Wall time spent inside one module's forward."""

    def __init__(self, module):
        self.total, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(lambda *a: setattr(self, "_t0", time.perf_counter()))
        module.register_forward_hook(
            lambda *a: setattr(self, "total", self.total + time.perf_counter() - self._t0)
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medtune.models.mavl import MAVLLoss

    torch.manual_seed(0)
    model, size = _model(args.tiny)
    b, e = args.batch_size, model.n_entities
    images = torch.randn(b, 3, size, size)
    labels = torch.randint(-1, 3, (b, e))
    index = torch.randint(0, 51, (b, e, 8))
    loss_fn, opt = MAVLLoss(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    dec = _Timer(model.decoder)
    params = sum(q.numel() for q in model.parameters())
    print(f"MAVL {params:,} parameters | {e} entities x {model.n_concepts} concepts | batch {b} | "
          f"{size} px | {torch.get_num_threads()} threads")  # fmt: skip

    def pretrain_step() -> float:
        t0 = time.perf_counter()
        out = model(images)
        fwd = time.perf_counter() - t0
        loss = loss_fn(model, out, labels, index)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return fwd

    model.train()
    pretrain_step()  # warm-up
    dec.total, fwd, t0 = 0.0, 0.0, time.perf_counter()
    for _ in range(args.steps):
        fwd += pretrain_step()
    pre_s = time.perf_counter() - t0
    pre_share = dec.total / fwd
    model.eval()
    with torch.no_grad():
        model.presence(images)
        dec.total, t0 = 0.0, time.perf_counter()
        for _ in range(args.steps):
            model.presence(images)
    zs_s = time.perf_counter() - t0
    zs_share = dec.total / zs_s
    res = {"pretrain_images_per_s": b * args.steps / pre_s, "zero_shot_images_per_s": b * args.steps / zs_s,
           "decoder_share_pretrain_forward": pre_share, "decoder_share_zero_shot": zs_share,
           "pretrain_forward_share_of_step": fwd / pre_s}  # fmt: skip
    print(
        f"pretrain step (fwd + loss + bwd + AdamW): {res['pretrain_images_per_s']:.2f} images/s "
        f"(forward {res['pretrain_forward_share_of_step']:.0%} of the step)"
    )
    print(f"zero-shot (presence, no_grad):           {res['zero_shot_images_per_s']:.2f} images/s")
    print(
        f"zero-shot / pretrain: {res['zero_shot_images_per_s'] / res['pretrain_images_per_s']:.2f}x"
    )
    print(f"decoder share of forward time: pretrain {pre_share:.0%} | zero-shot {zs_share:.0%}")
    return res


if __name__ == "__main__":
    main()
