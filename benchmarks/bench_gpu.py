#!/usr/bin/env python
"""GPU suite: training tokens/s, MFU and peak memory at Llama-3-8B + BiomedCLIP shape; generation tokens/s.

No weights are read: every model is built by a medtune builder on the ``meta`` device, moved with
``to_empty`` to the device and initialised at random (normal(0, 0.02) matrices, unit norm scales,
zero biases, zero LoRA ``B``, RoPE caches rebuilt). Random weights cost the same FLOPs as trained ones.

Rows (``--rows`` selects; all by default):

- ``vision padded``: ``medvlm_biomedclip_llama3_8b`` as ``vision_finetune`` trains it: BiomedCLIP
  ViT-B/16 (196 patch tokens) and the MLP connector trained in fp32, Llama-3-8B frozen in bf16, bf16
  autocast, AdamW, logits only at answer positions. Report-like samples: [bos, 196 image tokens,
  12-token question, 20-250-token report, skewed short]; ``--batch-size`` samples right-padded.
- ``vision grouped``: the same with :class:`medtune.data.sampling.LengthGroupedBatchSampler`.
- ``vision packed``: rows of ``--max-seq-len`` tokens packed by :mod:`medtune.data.packing`
  (block-causal flex-attention BlockMask on CUDA), as many rows as hold ``--batch-size`` samples
  on average.
- ``vision packed+compile``: the packed row with :func:`medtune.training.compile.compile_model`
  (per-layer torch.compile; fixed [rows, max_seq_len] shapes, so one compilation).
- ``lora padded``: ``medvlm_biomedclip_lora_llama3_8b`` (LoRA r=8 on q/k/v/o and MLP, fp32 adapters
  over a bf16 base; connector trained; encoder frozen), padded batches.
- ``generate bN``: :func:`medtune.generation.generate` greedy with the KV cache, batch 1 / 8 / 32,
  SLAKE-length prompts (196 image tokens + 14-30 text tokens), ``--new-tokens`` new tokens per row
  (no stop token, so every row runs the full length), bf16.

FLOPs rule (model FLOPs of the useful work; padding tokens count nothing), per step:

- trained parameters: 6 N per token they process (forward 2N, backward 4N: input and weight
  gradients); frozen parameters upstream of a trained part: 4 N (forward 2N, input gradient 2N, no
  weight gradient); frozen parameters with nothing trained upstream (the LoRA row's encoder): 2 N.
- tokens: the encoder processes 196 patch tokens per image (its N excludes nothing: the patch
  embedding is a matmul per patch); the connector the same 196 per image; the LLM body (all decoder
  parameters except the embedding table, a lookup, and the output projection) every non-padding
  token; the output projection only the answer tokens (medtune computes logits only there).
- attention: 12 L d T^2 per sequence of length T for fwd+bwd (4 L d T^2 forward: QK^T and AV; the
  backward twice that), per *sample* (packed rows attend block-diagonally, so a pack of samples of
  lengths T_i costs sum T_i^2); causal masking is not discounted (PaLM's convention). The
  encoder's attention is counted the same way with its own L, d and T = 196 (4 L d T^2, forward
  only, when the encoder is frozen).
- generation is reported as tokens/s only (decode is memory-bound; MFU is not meaningful there).

MFU = FLOPs per step / step time / peak. Peak: dense bf16 989 TFLOP/s for H100/H200 SXM, 312 for
A100 (``--peak-tflops`` overrides; other devices print n/a).

``--tiny`` runs the same code on CPU at tiny shapes (a tiny Llama-3 and ViT through the same
builders, fp32, aot_eager compile) in well under a minute: the smoke test of this script.

Prints one table: row, tokens/s (non-padding), ms/step, MFU, peak memory, loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtune.data.collate import collate_vision_chat  # noqa: E402
from medtune.data.packing import PackedDataset, attention_mask, collate_packed  # noqa: E402
from medtune.data.sampling import LengthGroupedBatchSampler  # noqa: E402
from medtune.testing.packing import report_lengths, synthetic_item  # noqa: E402

ROWS = (
    "vision padded",
    "vision grouped",
    "vision packed",
    "vision packed+compile",
    "lora padded",
    "generate b1",
    "generate b8",
    "generate b32",
)
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile-backend", default=None, help="default inductor (aot_eager: --tiny)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip rows not started within this many seconds",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        args.batch_size, args.max_seq_len, args.samples = 4, 256, 32
        args.steps, args.warmup, args.new_tokens = 1, 1, 4
        args.compile_backend = args.compile_backend or "aot_eager"
        args.threads = args.threads or 1  # tiny ops: threads only add overhead on a shared CPU
    args.compile_backend = args.compile_backend or "inductor"
    return args


# ----------------------------------------------------------------------------- models


def _tiny_llm_config(tmp: Path) -> str:
    cfg = {
        "vocab_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 1024,
        "rope_theta": 500000.0,
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def build(kind: str, tiny: bool, device: torch.device) -> nn.Module:
    """``kind`` "vision" | "lora": the model on ``meta``, then ``to_empty`` + random init on ``device``."""
    from medtune.models.builders import medvlm, medvlm_biomedclip_llama3_8b
    from medtune.models.lora import lora_llama3_from_hf_config, medvlm_biomedclip_lora_llama3_8b

    with torch.device("meta"):
        if not tiny:
            model = (
                medvlm_biomedclip_llama3_8b()
                if kind == "vision"
                else medvlm_biomedclip_lora_llama3_8b()
            )
        else:
            from medtune.models.builders import image_token_id_for_vocab
            from medtune.models.encoders import timm_vision
            from medtune.models.llama3 import llama3_from_hf_config

            with tempfile.TemporaryDirectory() as tmp:
                cfg = _tiny_llm_config(Path(tmp))
                if kind == "vision":
                    dec = llama3_from_hf_config(cfg)
                else:
                    dec = lora_llama3_from_hf_config(
                        cfg, ("q_proj", "k_proj", "v_proj", "output_proj"), True
                    )
            enc = timm_vision(
                "vit_base_patch16_224", image_size=32, depth=2, embed_dim=32, num_heads=2
            )
            model = medvlm(dec, enc, connector="mlp", image_token_id=image_token_id_for_vocab(512))
    model.to_empty(device=device)
    random_init(model, device)
    return model


@torch.no_grad()
def random_init(model: nn.Module, device: torch.device) -> None:
    """Random weights in place: normal(0, 0.02) matrices, ones for norm scales, zeros for biases
    and LoRA ``B`` (as LoRA starts), RoPE caches rebuilt (they were on meta)."""
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("lora_b.weight") or name.endswith("bias"):
            p.zero_()
        elif p.dim() < 2 and ("norm" in name or name.endswith("scale")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    with device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def setup_parts(model: nn.Module, kind: str, cuda: bool) -> list[nn.Parameter]:
    """vision: encoder + connector train (fp32), LLM frozen; lora: adapters + connector train,
    encoder frozen. The frozen LLM base sits in bf16 on CUDA. Returns the trained parameters."""
    from medtune.models.lora import adapters_to_fp32
    from medtune.training.params import set_trainable

    spec = (
        {"encoder": "full", "connector": "full", "llm": "frozen"}
        if kind == "vision"
        else {"encoder": "frozen", "connector": "full", "llm": "lora"}
    )
    set_trainable(model, spec)
    if cuda:
        model.decoder.to(torch.bfloat16)
        if kind == "lora":
            adapters_to_fp32(model.decoder)
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- FLOPs


def step_flops(model: nn.Module, batch: dict, lengths_of: dict, kind: str) -> float:
    """Model FLOPs of one training step on ``batch`` by the rule in the module docstring."""
    dec = model.decoder
    body_trained = body_frozen = 0
    for name, p in dec.named_parameters():
        if name.startswith("tok_embeddings") or name.startswith("output"):
            continue
        if p.requires_grad:
            body_trained += p.numel()
        else:
            body_frozen += p.numel()
    n_out = dec.output.weight.numel()
    enc = next(iter(model.encoders.values()))
    n_enc = sum(p.numel() for p in model.encoders.parameters())
    enc_trains = any(p.requires_grad for p in model.encoders.parameters())
    n_conn = sum(p.numel() for p in model.connectors.parameters())
    ids = batch["ids"]
    n_img = int(batch["image_counts"].sum())
    t_enc = enc.num_tokens
    tokens = sum(lengths_of[i] for i in ids)
    answers = int((batch["labels"][:, 1:] != -100).sum())
    layers, d = len(dec.layers), dec.tok_embeddings.embedding_dim
    enc_layers = len(_blocks(enc))
    enc_d = enc.out_dim
    f = 6 * n_conn * t_enc * n_img
    f += (6 if enc_trains else 2) * n_enc * t_enc * n_img
    f += (12 if enc_trains else 4) * enc_layers * enc_d * t_enc**2 * n_img
    f += (6 * body_trained + 4 * body_frozen) * tokens
    f += 4 * n_out * answers  # the output projection is frozen in both set-ups
    f += 12 * layers * d * sum(lengths_of[i] ** 2 for i in ids)
    return float(f)


def _blocks(enc: nn.Module) -> list[nn.Module]:
    from medtune.training.compile import block_list

    return block_list(enc)


# ----------------------------------------------------------------------------- rows


def data(model: nn.Module, args) -> tuple[list[dict], dict]:
    answers = report_lengths(args.samples, seed=0)
    items = [synthetic_item(model, i, answer_len=a) for i, a in enumerate(answers)]
    return items, {x["id"]: len(x["tokens"]) for x in items}


def batches(items, lengths_of, how: str, args) -> list[dict]:
    lengths = [lengths_of[x["id"]] for x in items]
    bs, n = args.batch_size, len(items)
    need = args.steps + args.warmup
    if how == "padded":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        idx = [perm[k : k + bs] for k in range(0, n, bs)]
    elif how == "grouped":
        idx = list(LengthGroupedBatchSampler(lengths, bs, seed=0))
    else:
        ds = PackedDataset(items, args.max_seq_len, lengths=lengths, seed=0)
        rows = max(1, round(bs * sum(lengths) / n / args.max_seq_len))
        cuda = args.device.startswith("cuda")
        return [
            collate_packed(
                [ds[p % len(ds)] for p in range(k, k + rows)],
                pad_id=0,
                seq_len=args.max_seq_len,
                dense_mask=not cuda,
            )
            for k in range(0, rows * need, rows)
        ]
    return [
        collate_vision_chat([items[i] for i in idx[k % len(idx)]], pad_id=0) for k in range(need)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(model, params, batch_list, lengths_of, kind, args, device) -> dict:
    from medtune.training.loss import answer_loss_sum

    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step(batch) -> float:
        tokens = batch["tokens"].to(device, non_blocking=True)
        kw = {}
        if "seq_lens" in batch:
            kw = {"mask": attention_mask(batch, device), "input_pos": batch["input_pos"].to(device)}
        images = {k: v.to(device) for k, v in batch["images"].items()}

        def forward():
            return model(tokens, images=images, image_counts=batch["image_counts"], **kw)

        loss, n = answer_loss_sum(forward, model.decoder, batch["labels"].to(device), cuda)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach() / n

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for b in batch_list[: args.warmup]:
        step(b)
    sync(device)
    t0 = time.perf_counter()
    timed = batch_list[args.warmup :]
    for b in timed:
        loss = step(b)
    sync(device)
    dt = (time.perf_counter() - t0) / len(timed)
    tok = sum(sum(lengths_of[i] for i in b["ids"]) for b in timed) / len(timed)
    flops = sum(step_flops(model, b, lengths_of, kind) for b in timed) / len(timed)
    return {
        "tokens_per_s": tok / dt,
        "ms_per_step": dt * 1e3,
        "flops_per_step": flops,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "loss": float(loss),
    }


def generate_row(model, batch_size: int, args, device) -> dict:
    from medtune.generation import generate

    g = torch.Generator().manual_seed(batch_size)
    items = [
        synthetic_item(
            model, i, answer_len=0, question_len=int(torch.randint(14, 31, (1,), generator=g))
        )
        for i in range(batch_size)
    ]
    prompts = [x["tokens"] for x in items]
    images = {k: torch.cat([x["images"][k] for x in items]).to(device) for k in items[0]["images"]}
    counts = torch.ones(batch_size, dtype=torch.long)
    cuda = device.type == "cuda"

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return generate(
                model,
                prompts,
                pad_id=0,
                stop_tokens=[],
                images=images,
                image_counts=counts,
                max_new_tokens=args.new_tokens,
            )

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    run()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = run()
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in out)
    return {
        "tokens_per_s": n / dt,
        "ms_per_step": dt * 1e3 / args.new_tokens,
        "flops_per_step": float("nan"),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "loss": float("nan"),
    }


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def run_rows(args) -> list[tuple[str, dict | str]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"bench_gpu: unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    results: list[tuple[str, dict | str]] = []
    start = time.perf_counter()

    def attempt(name, fn):
        t0 = time.perf_counter()
        if args.budget_s is not None and t0 - start > 0.9 * args.budget_s:
            results.append((name, "skipped: the time budget is spent"))
            return
        try:
            res = fn()
            res["wall_s"] = time.perf_counter() - t0
            results.append((name, res))
        except Exception as e:  # one failing row (e.g. no flex attention) must not hide the rest
            traceback.print_exc()
            results.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {results[-1][1]}", flush=True)

    vision_rows = [r for r in wanted if r.startswith("vision") or r.startswith("generate")]
    if vision_rows:
        model = build("vision", args.tiny, device)
        params = setup_parts(model, "vision", cuda)
        items, lengths_of = data(model, args)
        for name in ("vision padded", "vision grouped", "vision packed"):
            if name in wanted:
                how = name.split()[1]
                attempt(
                    name,
                    lambda how=how: train_row(
                        model,
                        params,
                        batches(items, lengths_of, how, args),
                        lengths_of,
                        "vision",
                        args,
                        device,
                    ),
                )
        gen = [r for r in wanted if r.startswith("generate")]
        if gen:
            model.eval()
            for name in gen:
                bsz = int(name.split("b")[-1])
                attempt(name, lambda bsz=bsz: generate_row(model, bsz, args, device))
            model.train()
        if "vision packed+compile" in wanted:
            from medtune.training.compile import compile_model

            def compiled():
                compile_model(model, backend=args.compile_backend)
                return train_row(
                    model,
                    params,
                    batches(items, lengths_of, "packed", args),
                    lengths_of,
                    "vision",
                    args,
                    device,
                )

            attempt("vision packed+compile", compiled)
            torch._dynamo.reset()  # drop the compiled graphs (they hold the model)
        del model, params
        if cuda:
            torch.cuda.empty_cache()
    if "lora padded" in wanted:

        def lora():
            model = build("lora", args.tiny, device)
            params = setup_parts(model, "lora", cuda)
            items, lengths_of = data(model, args)
            b = batches(items, lengths_of, "padded", args)
            return train_row(model, params, b, lengths_of, "lora", args, device)

        attempt("lora padded", lora)
    return results


def table(results, peak: float | None) -> str:
    head = (
        f"{'row':24s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>6s} {'peak GiB':>9s} {'loss':>7s}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results:
        if isinstance(r, str):
            lines.append(f"{name:24s} error: {r}")
            continue
        mfu = r["flops_per_step"] / (r["ms_per_step"] / 1e3) / peak if peak else math.nan
        mfu_s = "n/a" if math.isnan(mfu) else f"{mfu:.1%}"
        lines.append(
            f"{name:24s} {r['tokens_per_s']:10.0f} {r['ms_per_step']:9.1f} {mfu_s:>6s} "
            f"{r['peak_gib']:9.1f} {r['loss']:7.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"bench_gpu: torch {torch.__version__} | {name} | {'tiny' if args.tiny else '8B'} shapes | "
        f"batch {args.batch_size}, packed rows of {args.max_seq_len}, {args.warmup} warm-up + "
        f"{args.steps} timed steps per row | compile backend {args.compile_backend}",
        flush=True,
    )
    t0 = time.perf_counter()
    results = run_rows(args)  # a KeyboardInterrupt (the suite's timeout) ends here, no table
    peak = peak_flops(device, args.peak_tflops)
    print(f"\npeak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "\npeak FLOP/s unknown: MFU n/a")
    print(table(results, peak))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results), indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
