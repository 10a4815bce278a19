#!/usr/bin/env python
"""Contrastive step throughput with and without gathered features, and the retrieval scorer's speed.

1. images/s of one contrastive training step (forward, ClipLoss, backward, AdamW) of a small
   dual encoder built in memory (open_clip ViT + text transformer, random weights):
   ``local``: 1 process, batch B, in-batch negatives only (no gather);
   ``gather``: 2 gloo processes x B, features gathered with gradient (2B negatives each), DDP;
   ``single_2B``: 1 process, batch 2B (the same global batch as ``gather``).
2. ``medtune.eval.retrieval_metrics.itm_eval`` at n_images x n_texts (default 5,000 x 25,000, 5
   captions per image, as COCO's test split) against BLIP's naive per-row ``np.argsort`` loop.
3. ``blip``: images/s of one BLIP pretraining step (ITC with momentum distillation and queue, ITM
   with hard negatives, LM; forward, backward, AdamW; ``medtune.models.blip``) with towers of the
   CLIP-style model's size, 1 process, batch B, next to ``local``.
4. BLIP's re-ranked evaluation (``medtune.eval.blip_retrieval``: ITC matrix, each row's top
   ``k_test`` re-scored by ITM, both ways; ``inference_mode``, 256 ITM pairs per forward) at
   ``--rerank-images`` x ``--rerank-texts`` (default 1,000 x 5,000, 5 captions per image, k_test
   128) with a tiny BERT-shaped BLIP (``RERANK_CFG``: 2 BERT layers of width 64 with
   cross-attention, 24-token captions, a 2-block ViT of width 64 at 32 px), next to the same at
   k_test 1 (ITC features and matrix plus one ITM pair per row). The ITM forward passes are all
   of its cost (768,000 at the default size). The step's BLIP (``MODEL_CFG``, ~10x the FLOPs per
   pair) would take 25-60 minutes on one thread of a shared CPU, so at the same size it computes
   the ITC features and matrix in full and re-ranks the rows of 1 of ``--rerank-shard`` shards
   (50: the rows rank 0 of 50 ranks scores); its full-size time is printed as the measured ITC
   time plus all ITM pairs at the measured pairs/s, labelled EXTRAPOLATED.

    python benchmarks/bench_contrastive.py [--batch-size 32] [--steps 5] [--n-images 5000] [--tiny]

Prints each measurement and the ratios, all from this one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np
import torch
import torch.multiprocessing as mp

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 1000, "width": 128, "heads": 4, "layers": 4},
}
# the re-ranking evaluation at 1,000 x 5,000: a tiny BERT-shaped BLIP (BERT layers with
# cross-attention, as BLIP's; ~5.7 MFLOP per ITM pair, ~1/10 of MODEL_CFG's)
RERANK_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}
# ``--tiny``: the same code paths at a size that only checks that the script runs (smoke test)
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def _step_rate(cfg: dict, batch: int, steps: int, warmup: int, gather: bool) -> float:
    from medtune.models.dual_encoder import dual_encoder_from_towers
    from medtune.training.contrastive import ContrastiveLoss

    torch.manual_seed(0)
    model = dual_encoder_from_towers(cfg)
    rank, world = 0, 1
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        train = torch.nn.parallel.DistributedDataParallel(model)
    else:
        train = model
    loss_fn = ContrastiveLoss(gather_with_grad=gather)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(1, cfg["text_cfg"]["vocab_size"], (batch, ctx), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        res = loss_fn(train(images, tokens))
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
    dt = time.perf_counter() - t0
    return batch * world * steps / dt


def _blip(cfg: dict, queue_size: int, decoder: bool = True):
    """A BLIP with the CLIP-style model's tower sizes (timm ViT, BERT with cross-attention)."""
    from medtune.models.blip import blip_model
    from medtune.models.encoders import timm_vision

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    torch.manual_seed(0)
    enc = timm_vision(
        "vit_base_patch16_224",
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        embed_dim=v["width"],
        depth=v["layers"],
        num_heads=v["width"] // v["head_width"],
    )
    sizes = dict(
        hidden_size=t["width"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        intermediate_size=4 * t["width"],
        vocab_size=t["vocab_size"] + 2,
        max_position_embeddings=t["context_length"],
    )
    return blip_model(enc, None, embed_dim=cfg["embed_dim"], queue_size=queue_size,
                      decoder=decoder, dropout=0.0, text_sizes_override=sizes)  # fmt: skip


def _blip_step_rate(cfg: dict, batch: int, steps: int, warmup: int) -> float:
    model = _blip(cfg, queue_size=4 * batch).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(5, cfg["text_cfg"]["vocab_size"], (batch, ctx), generator=g)
    mask = torch.ones_like(ids)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        out = model(images, ids, mask, alpha=0.4, sample_keys=torch.arange(batch),
                    generator=torch.Generator().manual_seed(i))  # fmt: skip
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def _rerank_time(
    cfg: dict, n_images: int, n_texts: int, k_test: int, shard: int = 1
) -> tuple[float, float, int]:
    """(seconds of the re-ranked evaluation at ``k_test``, seconds of the same at k_test 1: the ITC
    features and matrix plus one ITM pair per row, ITM pairs scored) on random inputs.

    ``shard`` > 1: only the rows rank 0 of ``shard`` ranks would score are re-ranked (no process
    group: the other rows stay 0), the ITC features and matrix in full.
    """
    from medtune.eval.blip_retrieval import blip_retrieval_scores

    model = _blip(cfg, queue_size=8, decoder=False).eval()
    g = torch.Generator().manual_seed(0)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    ids = torch.randint(5, cfg["text_cfg"]["vocab_size"], (n_texts, ctx), generator=g)
    mask = torch.ones_like(ids)
    batches = [torch.randn(min(64, n_images - s), 3, size, size, generator=g)
               for s in range(0, n_images, 64)]  # fmt: skip
    t0 = time.perf_counter()
    # ITC + 1 ITM pair per row
    blip_retrieval_scores(model, batches, ids, mask, k_test=1, world=shard)
    t_itc = time.perf_counter() - t0
    t0 = time.perf_counter()
    blip_retrieval_scores(model, batches, ids, mask, k_test=k_test, world=shard)
    rows_i, rows_t = (min(n, n // shard + 1) for n in (n_images, n_texts))
    pairs = rows_i * min(k_test, n_texts) + rows_t * min(k_test, n_images)
    return time.perf_counter() - t0, t_itc, pairs


def _sizes(cfg: dict) -> str:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (f"text {t['layers']} x {t['width']} ({t['context_length']} tokens), vision "
            f"{v['layers']} x {v['width']} at {v['image_size']} px")  # fmt: skip


def _worker(rank: int, port: int, cfg: dict, batch: int, steps: int, warmup: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    rate = _step_rate(cfg, batch, steps, warmup, gather=True)
    if rank == 0:
        q.put(rate)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive_itm_eval(sim_i2t: np.ndarray, txt2img: np.ndarray) -> dict[str, float]:
    """BLIP train_retrieval.py::itm_eval, as written: a per-row argsort loop."""
    img2txt = [[] for _ in range(sim_i2t.shape[0])]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    ranks = np.zeros(sim_i2t.shape[0])
    for index, score in enumerate(sim_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    sim_t2i = sim_i2t.T
    ranks_t = np.zeros(sim_t2i.shape[0])
    for index, score in enumerate(sim_t2i):
        inds = np.argsort(score)[::-1]
        ranks_t[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks_t < 1)[0]) / len(ranks_t)
    return {"txt_r1": tr1, "img_r1": ir1}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a tiny dual encoder (smoke runs)")
    p.add_argument("--rerank-images", type=int, help="default 1000 (--tiny: 20)")
    p.add_argument("--rerank-texts", type=int, help="default 5000 (--tiny: 100)")
    p.add_argument("--k-test", type=int, help="default 128 (--tiny: 8)")
    p.add_argument(
        "--rerank-shard",
        type=int,
        help="the step's BLIP re-ranks the rows of 1 of this many shards (default 50; --tiny: 4)",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    b = args.batch_size
    cfg = TINY_CFG if args.tiny else MODEL_CFG
    print(
        f"torch.set_num_threads(1); batch B={b}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    local = _step_rate(cfg, b, args.steps, args.warmup, gather=False)
    single = _step_rate(cfg, 2 * b, args.steps, args.warmup, gather=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, cfg, b, args.steps, args.warmup, q))
        for r in range(2)
    ]
    for pr in procs:
        pr.start()
    gathered = q.get(timeout=1200)
    for pr in procs:
        pr.join()
    print(f"local      1 proc x B, no gather     {local:8.1f} images/s")
    print(f"single_2B  1 proc x 2B               {single:8.1f} images/s")
    print(f"gather     2 gloo procs x B, gathered {gathered:8.1f} images/s (2B negatives per rank)")
    print(f"gather/local = {gathered / local:.2f}x")
    print(f"gather/single_2B = {gathered / single:.2f}x")

    from medtune.eval.retrieval_metrics import itm_eval

    n_i, n_t = args.n_images, args.n_images * args.captions_per_image
    g = torch.Generator().manual_seed(0)
    txt2img = torch.arange(n_t) // args.captions_per_image
    sim = torch.randn(n_i, n_t, generator=g)
    sim[txt2img, torch.arange(n_t)] += 2.0  # some signal, so recall is not ~0
    t0 = time.perf_counter()
    fast = itm_eval(sim, None, txt2img)
    t_fast = time.perf_counter() - t0
    sim_np, t2i_np = sim.numpy(), txt2img.numpy()
    t0 = time.perf_counter()
    slow = naive_itm_eval(sim_np, t2i_np)
    t_slow = time.perf_counter() - t0
    same = (
        abs(fast["txt_r1"] - slow["txt_r1"]) < 1e-9 and abs(fast["img_r1"] - slow["img_r1"]) < 1e-9
    )
    print(f"retrieval {n_i} x {n_t}: itm_eval {t_fast:.2f} s, naive argsort {t_slow:.2f} s "
          f"(R@1 {'equal' if same else 'DIFFER'}: {fast['txt_r1']:.2f}/{fast['img_r1']:.2f})")  # fmt: skip
    print(f"naive/itm_eval = {t_slow / t_fast:.2f}x")

    blip = _blip_step_rate(cfg, b, args.steps, args.warmup)
    print(f"blip       1 proc x B, ITC+ITM+LM     {blip:8.1f} images/s (momentum + queue)")
    print(f"blip/local = {blip / local:.2f}x")
    n_i, n_t, k = (20, 100, 8) if args.tiny else (1000, 5000, 128)
    n_i, n_t = args.rerank_images or n_i, args.rerank_texts or n_t
    k = args.k_test or k
    rcfg = TINY_CFG if args.tiny else RERANK_CFG
    t_all, t_itc, pairs = _rerank_time(rcfg, n_i, n_t, k)
    print(f"rerank {n_i} x {n_t} k_test {k}: {t_all:.2f} s ({pairs} ITM pairs, "
          f"{pairs / max(t_all - t_itc, 1e-9):.0f} pairs/s; k_test 1: {t_itc:.2f} s) "
          f"[{'tiny' if args.tiny else 'RERANK_CFG'}: {_sizes(rcfg)}]")  # fmt: skip
    print(f"rerank/k_test_1 = {t_all / t_itc:.2f}x")
    # the step's BLIP at the same size: the ITC part in full, the ITM re-ranking of 1/shard of
    # the rows measured; the whole re-ranking extrapolated from its pairs/s
    shard = args.rerank_shard or (4 if args.tiny else 50)
    s_all, s_itc, s_pairs = _rerank_time(cfg, n_i, n_t, k, shard=shard)
    rate = s_pairs / max(s_all - s_itc, 1e-9)
    est = s_itc + pairs / rate
    name = "tiny" if args.tiny else "MODEL_CFG"
    print(f"rerank_step_model {n_i} x {n_t} k_test {k}, rows of 1 of {shard} shards: {s_all:.2f} s "
          f"measured ({s_pairs} ITM pairs, {rate:.0f} pairs/s; ITC + 1 pair per row: "
          f"{s_itc:.2f} s) [{name}: {_sizes(cfg)}]")  # fmt: skip
    print(f"rerank_step_model {n_i} x {n_t} k_test {k}: EXTRAPOLATED {est:.0f} s "
          f"(ITC measured + {pairs} ITM pairs at {rate:.0f} pairs/s; not measured)")  # fmt: skip
    print(f"rerank_step_model/rerank (extrapolated) = {est / t_all:.2f}x")


if __name__ == "__main__":
    main()
