#!/usr/bin/env python
"""Generation speed of :func:`medtune.generation.generate` on a small random MedVLM.

Two comparisons, from one run:

1. **batched vs per-sample**: 8 image+question prompts of different lengths (left-padded into one
   batch) against the same 8 prompts one at a time; greedy, ``--new-tokens`` (32) new tokens;
   throughput in generated tokens per second.
2. **KV cache vs no cache**: the batch of 8 at 64 new tokens, with the KV cache (image embeddings
   at prefill only, one token per step) against full recomputation of the whole sequence (images
   included) at every step.

The model is random (Llama-3 architecture: width 256, 4 layers, 8 heads, 2 KV heads, SwiGLU 768,
vocabulary 4,352 with Llama-3's 256 special tokens at the end; open_clip ViT 64 px / patch 16,
width 128, 2 layers -> 16 image tokens through an MLP connector): big enough that timings mean
something on a CPU, small enough to build in a second. Stop tokens are ignored (a random model
rarely emits one; throughput counts the tokens actually generated). Each timing is the median of
``--repeats`` runs after one warm-up. The outputs are also compared: batched == per-sample and
cache == no cache, token for token.

Usage::

    python benchmarks/bench_generate.py [--threads 1] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medtune.generation import generate
from medtune.models.builders import medvlm
from medtune.models.encoders import _build_open_clip_visual
from medtune.models.llama3 import llama3_tiny

BASE_VOCAB = 4096
VOCAB = BASE_VOCAB + 256


def build_model(tiny: bool) -> torch.nn.Module:
    """A random MedVLM (see the module docstring); ``tiny`` shrinks it for smoke runs."""
    torch.manual_seed(0)
    width, layers = (64, 2) if tiny else (256, 4)
    decoder = llama3_tiny(
        VOCAB,
        embed_dim=width,
        num_layers=layers,
        num_heads=8 if not tiny else 4,
        num_kv_heads=2,
        intermediate_dim=3 * width,
        max_seq_len=512,
    )
    clip = {
        "model_cfg": {
            "embed_dim": 128,
            "vision_cfg": {
                "image_size": 64,
                "patch_size": 16,
                "width": 64 if tiny else 128,
                "layers": 2,
                "head_width": 32,
            },
        }
    }
    enc = _build_open_clip_visual(clip, output="patch")
    model = medvlm(decoder, enc, connector="mlp", image_token_id=BASE_VOCAB + 2)
    return model.eval()


def make_prompts(
    model: torch.nn.Module, n: int = 8
) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """``n`` prompts: BOS, header ids, 16 image placeholders, 8..36 question tokens, header; one image each."""
    g = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(n):
        q = torch.randint(0, BASE_VOCAB, (8 + 4 * i,), generator=g).tolist()
        prompts.append(
            [
                BASE_VOCAB,
                BASE_VOCAB + 6,
                10,
                BASE_VOCAB + 7,
                *[model.image_token_id] * model.tokens_per_image,
                *q,
                BASE_VOCAB + 9,
                BASE_VOCAB + 6,
                11,
                BASE_VOCAB + 7,
            ]
        )
    images = {"image": torch.randn(n, 3, 64, 64, generator=g)}
    return prompts, images


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: steady on a shared box)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--new-tokens",
        type=int,
        default=32,
        help="new tokens in the batched vs per-sample comparison",
    )
    p.add_argument(
        "--cache-new-tokens",
        type=int,
        default=64,
        help="new tokens in the cache vs no-cache comparison",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a smaller model and fewer tokens (smoke test)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.new_tokens, args.cache_new_tokens, args.repeats = 4, 8, 1
    model = build_model(args.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    prompts, images = make_prompts(model)
    stop = [VOCAB + 1]  # never generated: every row runs to max_new_tokens
    kw = {"pad_id": 0, "stop_tokens": stop}
    print(
        f"model: random MedVLM, {n_params / 1e6:.2f}M parameters, {model.tokens_per_image} image tokens; "
        f"prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens; device cpu, "
        f"torch.set_num_threads({args.threads})",
        flush=True,
    )

    # 1. batched vs per-sample
    def batched(max_new=args.new_tokens, use_cache=True):
        return generate(
            model,
            prompts,
            images=images,
            image_counts=torch.ones(len(prompts), dtype=torch.long),
            max_new_tokens=max_new,
            use_cache=use_cache,
            **kw,
        )

    def per_sample():
        return [
            generate(
                model,
                [pr],
                images={"image": images["image"][i : i + 1]},
                image_counts=torch.ones(1, dtype=torch.long),
                max_new_tokens=args.new_tokens,
                **kw,
            )[0]
            for i, pr in enumerate(prompts)
        ]

    t_batch, out_batch = timed(batched, args.repeats)
    t_single, out_single = timed(per_sample, args.repeats)
    n_tok = sum(map(len, out_batch))
    tps_batch, tps_single = n_tok / t_batch, sum(map(len, out_single)) / t_single
    print(f"batched (8)   {tps_batch:8.1f} tokens/s  ({n_tok} tokens in {t_batch * 1e3:.0f} ms)")
    print(
        f"per-sample    {tps_single:8.1f} tokens/s  ({sum(map(len, out_single))} tokens in {t_single * 1e3:.0f} ms)"
    )
    print(f"same tokens: {out_batch == out_single}")
    print(f"batched/per-sample throughput = {tps_batch / tps_single:.2f}x")

    # 2. KV cache vs no cache
    t_cache, out_cache = timed(lambda: batched(args.cache_new_tokens, True), args.repeats)
    t_full, out_full = timed(lambda: batched(args.cache_new_tokens, False), args.repeats)
    n_c, n_f = sum(map(len, out_cache)), sum(map(len, out_full))
    print(
        f"kv cache      {n_c / t_cache:8.1f} tokens/s  ({n_c} tokens in {t_cache * 1e3:.0f} ms, "
        f"{args.cache_new_tokens} new tokens x 8)"
    )
    print(f"no cache      {n_f / t_full:8.1f} tokens/s  ({n_f} tokens in {t_full * 1e3:.0f} ms)")
    print(f"same tokens: {out_cache == out_full}")
    print(
        f"kv-cache/no-cache speed at {args.cache_new_tokens} new tokens = {t_full / t_cache:.2f}x"
    )


if __name__ == "__main__":
    main()
