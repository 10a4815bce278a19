#!/usr/bin/env python
"""Generation speed of :func:`medtune.generation.generate` on a small random MedVLM.

Four comparisons, from one run:

1. **batched vs per-sample**: 8 image+question prompts of different lengths (left-padded into one
   batch) against the same 8 prompts one at a time; greedy, ``--new-tokens`` (32) new tokens;
   throughput in generated tokens per second.
2. **KV cache vs no cache**: the batch of 8 at 64 new tokens, with the KV cache (image embeddings
   at prefill only, one token per step) against full recomputation of the whole sequence (images
   included) at every step.
3. **beam search, batched vs per-sample**: the same 8 prompts at ``--beams`` (4) beams and
   ``--beam-new-tokens`` (32) new tokens (:func:`medtune.generation.beam_search.beam_search`: one prefill
   per prompt, the KV cache repeated per beam and reordered every step), one batch against one
   prompt at a time.
4. **medtune vs HF transformers**: ``LlavaForConditionalGeneration.generate`` (greedy, left
   padding, its own KV cache) against medtune's ``generate`` at batch 1 and batch 8, on the model
   ``medtune export hf`` writes from the same MedVLM (:func:`medtune.training.export_llava.llava_model`;
   the tower reads its last block, ``feature_layer=-1``, so the export is exact). Each side's
   outputs are checked token for token.

The model is random (Llama-3 architecture: width 256, 4 layers, 8 heads, 2 KV heads, SwiGLU 768,
vocabulary 4,352 with Llama-3's 256 special tokens at the end; open_clip ViT 64 px / patch 16,
width 128, 2 layers -> 16 image tokens through an MLP connector): big enough that timings mean
something on a CPU, small enough to build in a second. Stop tokens are ignored (a random model
rarely emits one; throughput counts the tokens actually generated). Each timing is the median of
``--repeats`` runs after one warm-up. The outputs are also compared: batched == per-sample and
cache == no cache, token for token.

Usage::

    python benchmarks/bench_generate.py [--threads 1] [--repeats 3] [--tiny]

Ratios printed (``X.XXx``, > 1 means the first named is faster)::

    batched/per-sample throughput = X.XXx
    kv-cache/no-cache speed at 64 new tokens = X.XXx
    beam search (4 beams) batched/per-sample throughput = X.XXx
    medtune/hf_llava throughput at batch 1 = X.XXx
    medtune/hf_llava throughput at batch 8 = X.XXx
    llama2-shaped batched/per-sample throughput = X.XXx
    qwen2_5-shaped batched/per-sample throughput = X.XXx

5. **other LLM families**: comparison 1 on the same MedVLM with a Llama-2-shaped and a
   Qwen2.5-shaped decoder (placeholder -200), outputs checked token for token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medtune.generation import generate
from medtune.models.builders import medvlm
from medtune.models.encoders.open_clip_towers import _build_open_clip_visual
from medtune.models.llama3 import llama3_tiny

BASE_VOCAB = 4096
VOCAB = BASE_VOCAB + 256


def build_model(tiny: bool, feature_layer: int | None = None) -> torch.nn.Module:
    """A random MedVLM (see the module docstring); ``tiny`` shrinks it for smoke runs;
    ``feature_layer`` -1 reads the tower's last block before its final norm (LLaVA-exportable)."""
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
    enc = _clip_encoder(tiny, feature_layer)
    model = medvlm(decoder, enc, connector="mlp", image_token_id=BASE_VOCAB + 2)
    return model.eval()


def _clip_encoder(tiny: bool, feature_layer: int | None = None) -> torch.nn.Module:
    """The random open_clip ViT of every benchmark model (64 px, patch 16 -> 16 tokens)."""
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
    return _build_open_clip_visual(clip, output="patch", feature_layer=feature_layer)


def build_family_model(family: str, tiny: bool) -> torch.nn.Module:
    """The same MedVLM with a Llama-2-shaped (``num_kv_heads == num_heads``, RoPE base 10k) or a
    Qwen2.5-shaped (q/k/v biases, 2 KV heads, RoPE base 1e6) decoder of the same width, and the
    family's placeholder id (-200: no reserved token; :mod:`medtune.models.llm.placeholder`)."""
    from medtune.models.llm.builders import family_medvlm
    from medtune.models.llm.llama2 import llama2
    from medtune.models.llm.qwen2_5 import qwen2

    torch.manual_seed(0)
    width, layers, heads = (64, 2, 4) if tiny else (256, 4, 8)
    shape = dict(vocab_size=VOCAB, num_layers=layers, num_heads=heads, embed_dim=width,
                 intermediate_dim=3 * width, max_seq_len=512)  # fmt: skip
    if family == "llama2":
        decoder = llama2(num_kv_heads=heads, **shape)
    else:
        decoder = qwen2(num_kv_heads=2, rope_base=1_000_000.0, **shape)
    return family_medvlm(decoder, family, _clip_encoder(tiny), connector="mlp").eval()


def compare_families(args: argparse.Namespace) -> None:
    """Batched vs per-sample greedy generation on the Llama-2- and Qwen2.5-shaped models."""
    for family in ("llama2", "qwen2_5"):
        model = build_family_model(family, args.tiny)
        prompts, images = make_prompts(model)
        kw = {"pad_id": 0, "stop_tokens": [VOCAB + 1], "max_new_tokens": args.new_tokens}

        def batched(model=model, prompts=prompts, images=images, kw=kw):
            ones = torch.ones(len(prompts), dtype=torch.long)
            return generate(model, prompts, images=images, image_counts=ones, **kw)

        def per_sample(model=model, prompts=prompts, images=images, kw=kw):
            one = torch.ones(1, dtype=torch.long)
            return [
                generate(
                    model,
                    [pr],
                    images={"image": images["image"][i : i + 1]},
                    image_counts=one,
                    **kw,
                )[0]  # fmt: skip
                for i, pr in enumerate(prompts)
            ]

        t_b, out_b = timed(batched, args.repeats)
        t_s, out_s = timed(per_sample, args.repeats)
        n_b, n_s = sum(map(len, out_b)), sum(map(len, out_s))
        print(
            f"{family}-shaped batched (8) {n_b / t_b:8.1f} tokens/s, per-sample {n_s / t_s:8.1f} tokens/s"
        )
        print(f"same tokens ({family}): {out_b == out_s}")
        print(f"{family}-shaped batched/per-sample throughput = {(n_b / t_b) / (n_s / t_s):.2f}x")


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
    p.add_argument("--beams", type=int, default=4, help="beams in the beam search comparison")
    p.add_argument(
        "--beam-new-tokens",
        type=int,
        default=32,
        help="new tokens in the beam search comparison",
    )
    p.add_argument(
        "--hf-new-tokens",
        type=int,
        default=32,
        help="new tokens in the medtune vs HF comparison",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a smaller model and fewer tokens (smoke test)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.new_tokens, args.cache_new_tokens, args.repeats = 4, 8, 1
        args.beam_new_tokens, args.hf_new_tokens = 4, 4
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

    # 3. beam search, batched vs per-sample
    beam = {"num_beams": args.beams, "max_new_tokens": args.beam_new_tokens, **kw}
    t_bb, out_bb = timed(
        lambda: generate(
            model,
            prompts,
            images=images,
            image_counts=torch.ones(len(prompts), dtype=torch.long),
            **beam,
        ),
        args.repeats,
    )
    t_bs, out_bs = timed(
        lambda: [
            generate(
                model,
                [pr],
                images={"image": images["image"][i : i + 1]},
                image_counts=torch.ones(1, dtype=torch.long),
                **beam,
            )[0]
            for i, pr in enumerate(prompts)
        ],
        args.repeats,
    )
    n_bb, n_bs = sum(map(len, out_bb)), sum(map(len, out_bs))
    print(
        f"beam batched  {n_bb / t_bb:8.1f} tokens/s  ({n_bb} tokens in {t_bb * 1e3:.0f} ms, "
        f"{args.beams} beams, {args.beam_new_tokens} new tokens x 8)"
    )
    print(f"beam single   {n_bs / t_bs:8.1f} tokens/s  ({n_bs} tokens in {t_bs * 1e3:.0f} ms)")
    print(f"same tokens: {out_bb == out_bs}")
    print(
        f"beam search ({args.beams} beams) batched/per-sample throughput = "
        f"{(n_bb / t_bb) / (n_bs / t_bs):.2f}x"
    )

    # 4. medtune vs HF transformers' Llava generate
    compare_hf(args)

    # 5. other LLM families: batched vs per-sample
    compare_families(args)


def compare_hf(args: argparse.Namespace) -> None:
    """medtune ``generate`` vs ``LlavaForConditionalGeneration.generate``, greedy, batch 1 and 8."""
    from medtune.training.export_llava import llava_model

    # the model medtune export hf writes (medtune.training.export_llava), from the same weights
    med = build_model(args.tiny, feature_layer=-1)
    d = med.decoder
    heads = d.layers[0].attn.num_heads
    hf = llava_model(
        med,
        {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": d.tok_embeddings.embedding_dim,
            "intermediate_size": d.layers[0].mlp.w1.out_features,
            "num_hidden_layers": len(d.layers),
            "num_attention_heads": heads,
            "num_key_value_heads": d.layers[0].attn.num_kv_heads,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
            "tie_word_embeddings": False,
        },
    )
    hf.eval()
    hf.config.use_cache = True
    hf.config.text_config.use_cache = True
    hf.generation_config.pad_token_id = 0
    prompts, images = make_prompts(med)
    stop = VOCAB + 1  # never generated: every row runs to max_new_tokens on both sides
    n_new = args.hf_new_tokens

    def run_medtune(rows: list[int]) -> list[list[int]]:
        return generate(
            med,
            [prompts[i] for i in rows],
            pad_id=0,
            stop_tokens=[stop],
            images={"image": images["image"][rows]},
            image_counts=torch.ones(len(rows), dtype=torch.long),
            max_new_tokens=n_new,
        )

    def run_hf(rows: list[int], **gen) -> list[list[int]]:
        plen = max(len(prompts[i]) for i in rows)
        ids = torch.zeros((len(rows), plen), dtype=torch.long)
        am = torch.zeros((len(rows), plen), dtype=torch.long)
        for j, i in enumerate(rows):  # left padding, as HF recommends for decoder-only generate
            ids[j, plen - len(prompts[i]) :] = torch.tensor(prompts[i])
            am[j, plen - len(prompts[i]) :] = 1
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=am,
                pixel_values=images["image"][rows],
                do_sample=False,
                pad_token_id=0,
                **({"max_new_tokens": n_new, "num_beams": 1, "eos_token_id": stop} | gen),
            )
        return out[:, plen:].tolist()

    print(
        f"\nmedtune vs HF LlavaForConditionalGeneration.generate: greedy, {n_new} new tokens, "
        f"the exported model (medtune export hf, {med.tokens_per_image} image tokens)"
    )
    for bsz in (1, 8):
        # batch 1: each prompt alone, one after another; batch 8: all prompts in one left-padded batch
        groups = [[i] for i in range(len(prompts))] if bsz == 1 else [list(range(len(prompts)))]
        t_m, out_m = timed(lambda gs=groups: [o for g in gs for o in run_medtune(g)], args.repeats)
        t_h, out_h = timed(lambda gs=groups: [o for g in gs for o in run_hf(g)], args.repeats)
        n_m, n_h = sum(map(len, out_m)), sum(map(len, out_h))
        print(
            f"batch {bsz}  medtune  {n_m / t_m:8.1f} tokens/s  ({n_m} tokens in {t_m * 1e3:.0f} ms)"
        )
        print(
            f"batch {bsz}  hf_llava {n_h / t_h:8.1f} tokens/s  ({n_h} tokens in {t_h * 1e3:.0f} ms)"
        )
        print(f"same tokens: {out_m == out_h}")
        print(f"medtune/hf_llava throughput at batch {bsz} = {(n_m / t_m) / (n_h / t_h):.2f}x")

    # beam search follows HF's rules: same hypotheses as HF's beam search, with a stop token the
    # model does say (so beams finish at different lengths and the length penalty matters)
    rows = list(range(len(prompts)))
    said = run_medtune(rows)
    eos = max(set(t for o in said for t in o), key=lambda t: sum(o.count(t) for o in said))
    for lp in (1.0, 0.0):
        ours = generate(
            med,
            prompts,
            pad_id=0,
            stop_tokens=[eos],
            images=images,
            image_counts=torch.ones(len(rows), dtype=torch.long),
            max_new_tokens=n_new,
            num_beams=args.beams,
            length_penalty=lp,
        )
        theirs = run_hf(rows, num_beams=args.beams, eos_token_id=eos, length_penalty=lp)
        theirs = [o[: o.index(eos)] if eos in o else o for o in theirs]
        print(
            f"beam search ({args.beams} beams, length_penalty {lp}, stop token {eos}, batch 8) "
            f"same tokens as HF: {ours == theirs} (lengths {[len(o) for o in ours]})"
        )


if __name__ == "__main__":
    main()
