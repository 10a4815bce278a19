#!/usr/bin/env python
"""Training step time of vision-only tuning: medtune's MedVLM vs HF ``LlavaForConditionalGeneration`` vs a bare loop.

What is measured: one training step = forward + loss on the answer tokens + backward + ``torch.optim.AdamW``
step + ``zero_grad``, with the LLM frozen and the image encoder + connector trained (fp32 on CPU; bf16
autocast over fp32 weights on CUDA, as the recipe does). Three set-ups, built at one matched shape:

- ``medtune``: ``medtune.models.builders.medvlm(llama3_tiny(...), timm_vision("vit_tiny_patch16_224", ...),
  connector="mlp")``, parts frozen/trained with ``medtune.training.params.set_trainable``, and the step of
  ``recipes/vision_finetune.py``: its forward is :func:`medtune.training.loop.answer_logits` (called here,
  ``model(tokens, images=..., image_counts=...)`` with logits at the answer positions), summed CE over the
  shifted labels, ``torchtune.training.scale_grads`` by 1/answer-tokens, AdamW step.
- ``hf_llava``: transformers' ``LlavaForConditionalGeneration`` with a ``LlamaConfig`` text model and a
  ``CLIPVisionConfig`` tower of the same shapes, ``projector_hidden_act="gelu"``,
  ``vision_feature_select_strategy="default"`` (CLS dropped: same 196 tokens as medtune's patch tokens),
  ``vision_feature_layer=-1``, sdpa attention, ``use_cache=False``; images as ``pixel_values``,
  placeholders as ``image_token_index``; ``model.language_model`` and ``lm_head`` frozen.
- ``bare``: the same medtune modules driven by hand (timm trunk -> drop CLS -> MLP connector ->
  ``index_put`` of the image tokens at precomputed placeholder positions -> ``decoder.layers`` ->
  ``norm`` -> ``output``), mean CE: a floor with no model or recipe machinery.
- ``medtune_all_logits``: the ``medtune`` step with logits at every position (the recipe computes them
  only at the answer positions, :func:`medtune.training.loss.AnswerCrossEntropy`; HF and ``bare`` compute
  them everywhere, as usual), to show what that selection saves.

All three start from the *same weights* (medtune's are copied into the HF model: torchtune's
``tune_to_hf`` for the Llama part, a timm -> CLIP key map for the tower), so the script also checks that
the three compute the same loss at step 0 (printed), and that they hold the same number of trainable and
frozen parameters (tolerance below, printed). The encoder defaults to a CLIP-layout timm ViT
(``pre_norm=True, final_norm=False``: a LayerNorm before the blocks, none after, no patch-embedding bias)
so that it is the same network as HF's CLIP tower; ``--encoder-norm timm`` uses stock ViT-tiny instead
(final LayerNorm, patch bias: +192 params on medtune's side, and no loss check). The one structural
difference left: HF's ``CLIPVisionModel`` holds a ``post_layernorm`` (2 x width params) applied only to the
pooled CLS output, unused by LLaVA's feature path: it counts as trainable but never gets a gradient.

Timing: after ``--warmup`` steps per set-up, ``--steps`` repetitions, each running one step of every
set-up round-robin (order rotated each repetition: A B C, B C A, C A B, ...) so that load drift on a
shared machine hits all three alike; the median per set-up is reported, with min and max. Batch, tokens,
images and labels are identical for the three.

Usage::

    python benchmarks/bench_vision_finetune.py                        # width 512, 4 layers, vocab 32k, b=8
    python benchmarks/bench_vision_finetune.py --steps 20 --threads 2 --width 256
    python benchmarks/bench_vision_finetune.py --tiny --steps 2       # smoke test, a few seconds
    python benchmarks/bench_vision_finetune.py --profile 3            # + torch.profiler table per set-up

Prints the shapes, the thread count, a parameter table, the step-0 losses, and then::

    medtune   123.4 ms/step (min ..., max ...)
    ...
    medtune/hf_llava = X.XXx
    medtune/bare = Y.YYx
    (median of per-repetition ratios ...; ratio of minima ...)   # cross-checks for a loaded machine
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PARAM_TOLERANCE = (
    1e-3  # relative difference allowed between set-ups' trainable / frozen parameter counts
)


@dataclass
class Shape:
    batch: int
    seq_len: int
    answer_tokens: int
    width: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_base: float
    enc_width: int
    enc_depth: int
    enc_heads: int
    image_size: int
    patch: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_token_id(self) -> int:
        # Llama-3 layout: the vocabulary ends with 256 special tokens, <|reserved_special_token_0|> the third.
        return self.vocab - 256 + 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed repetitions (one step of each set-up per repetition)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per set-up before timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--seq-len", type=int, default=256, help="tokens per sample, image tokens included"
    )
    p.add_argument(
        "--answer-tokens",
        type=int,
        default=16,
        help="loss-bearing tokens at the end of each sample",
    )
    p.add_argument("--width", type=int, default=512, help="LLM width")
    p.add_argument("--layers", type=int, default=4, help="LLM layers")
    p.add_argument("--heads", type=int, default=None, help="LLM heads (default width/64)")
    p.add_argument(
        "--kv-heads", type=int, default=None, help="LLM kv heads (default heads/4, at least 1)"
    )
    p.add_argument(
        "--intermediate",
        type=int,
        default=None,
        help="LLM MLP width (default 3.5 x width, as Llama-3-8B)",
    )
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--enc-width", type=int, default=192, help="ViT width (ViT-tiny: 192)")
    p.add_argument("--enc-depth", type=int, default=12, help="ViT depth (ViT-tiny: 12)")
    p.add_argument("--enc-heads", type=int, default=3, help="ViT heads (ViT-tiny: 3)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument(
        "--encoder-norm",
        choices=("clip", "timm"),
        default="clip",
        help="clip: timm ViT in CLIP layout (pre-norm, no final norm, no patch bias), same network as HF's "
        "CLIP tower; timm: stock vit_tiny layout",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tiny", action="store_true", help="very small shapes (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: all cores, at most 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile N steps of each set-up with torch.profiler",
    )
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(
            batch_size=2,
            seq_len=24,
            answer_tokens=4,
            width=64,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate=128,
            vocab=512,
            enc_width=32,
            enc_depth=2,
            enc_heads=2,
            image_size=32,
            patch=8,
        ).items():
            setattr(args, k, v)
    return args


def make_shape(args: argparse.Namespace) -> Shape:
    heads = args.heads or max(1, args.width // 64)
    kv = args.kv_heads or max(1, heads // 4)
    s = Shape(
        batch=args.batch_size,
        seq_len=args.seq_len,
        answer_tokens=args.answer_tokens,
        width=args.width,
        layers=args.layers,
        heads=heads,
        kv_heads=kv,
        intermediate=args.intermediate or int(3.5 * args.width),
        vocab=args.vocab,
        rope_base=500_000.0,
        enc_width=args.enc_width,
        enc_depth=args.enc_depth,
        enc_heads=args.enc_heads,
        image_size=args.image_size,
        patch=args.patch,
    )
    text = s.seq_len - s.image_tokens
    if text < s.answer_tokens + 2:
        raise SystemExit(
            f"--seq-len {s.seq_len} leaves {text} text tokens beside {s.image_tokens} image tokens "
            f"({s.image_size}px / patch {s.patch}); need at least {s.answer_tokens + 2}"
        )
    return s


# ---------------------------------------------------------------------------------------------- data
def make_batch(s: Shape, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Tokens ``[b, s]``: BOS, 3 header ids, the image placeholders, question ids, answer ids (labelled)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, s.vocab - 256, (s.batch, s.seq_len), generator=g)
    tokens[:, 0] = s.vocab - 256  # <|begin_of_text|>
    tokens[:, 4 : 4 + s.image_tokens] = s.image_token_id
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, -s.answer_tokens :] = tokens[:, -s.answer_tokens :]
    images = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    return {
        "tokens": tokens.to(device),
        "labels": labels.to(device),
        "images": images.to(device),
        "image_counts": torch.ones(s.batch, dtype=torch.long),
    }


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets, as ``recipes/vision_finetune.py`` builds them."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


# ---------------------------------------------------------------------------------------------- models
def build_medtune(s: Shape, encoder_norm: str):
    from medtune.models.builders import medvlm
    from medtune.models.encoders import timm_vision
    from medtune.models.llama3 import llama3_tiny
    from medtune.training.params import set_trainable

    dec = llama3_tiny(
        s.vocab,
        embed_dim=s.width,
        num_layers=s.layers,
        num_heads=s.heads,
        num_kv_heads=s.kv_heads,
        intermediate_dim=s.intermediate,
        max_seq_len=s.seq_len,
    )
    extra = dict(pre_norm=True, final_norm=False) if encoder_norm == "clip" else {}
    enc = timm_vision(
        "vit_tiny_patch16_224",
        image_size=s.image_size,
        patch_size=s.patch,
        depth=s.enc_depth,
        embed_dim=s.enc_width,
        num_heads=s.enc_heads,
        **extra,
    )
    model = medvlm(dec, enc, connector="mlp", image_token_id=s.image_token_id)
    set_trainable(model, {"encoder": "full", "connector": "full", "llm": "frozen"})
    return model


def build_hf_llava(s: Shape):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.width,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_base},
        use_cache=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=s.enc_width,
        intermediate_size=4 * s.enc_width,
        num_hidden_layers=s.enc_depth,
        num_attention_heads=s.enc_heads,
        image_size=s.image_size,
        patch_size=s.patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=s.image_token_id,
        image_seq_length=s.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(True)
    return model


def medtune_to_hf_state(model, s: Shape) -> dict[str, torch.Tensor]:
    """MedVLM (CLIP-layout timm tower, mlp connector, torchtune Llama-3) -> LlavaForConditionalGeneration keys."""
    from torchtune.models.convert_weights import tune_to_hf

    out: dict[str, torch.Tensor] = {}
    for k, v in tune_to_hf(
        model.decoder.state_dict(), num_heads=s.heads, num_kv_heads=s.kv_heads, dim=s.width
    ).items():
        out[
            k if k.startswith("lm_head") else "model.language_model." + k.removeprefix("model.")
        ] = v
    t = model.encoders["image"].tower.state_dict()
    vp = "model.vision_tower."
    out[vp + "embeddings.class_embedding"] = t["cls_token"].reshape(-1)
    out[vp + "embeddings.position_embedding.weight"] = t["pos_embed"][0]
    out[vp + "embeddings.patch_embedding.weight"] = t["patch_embed.proj.weight"]
    for w in ("weight", "bias"):
        out[vp + f"pre_layrnorm.{w}"] = t[f"norm_pre.{w}"]
    for i in range(s.enc_depth):
        b, h = f"blocks.{i}.", f"{vp}encoder.layers.{i}."
        for w in ("weight", "bias"):
            for name, piece in zip(
                ("q_proj", "k_proj", "v_proj"), t[b + f"attn.qkv.{w}"].chunk(3, dim=0)
            ):
                out[h + f"self_attn.{name}.{w}"] = piece
            out[h + f"self_attn.out_proj.{w}"] = t[b + f"attn.proj.{w}"]
            out[h + f"layer_norm1.{w}"] = t[b + f"norm1.{w}"]
            out[h + f"layer_norm2.{w}"] = t[b + f"norm2.{w}"]
            out[h + f"mlp.fc1.{w}"] = t[b + f"mlp.fc1.{w}"]
            out[h + f"mlp.fc2.{w}"] = t[b + f"mlp.fc2.{w}"]
    c = model.connectors["image"].state_dict()
    for w in ("weight", "bias"):
        out[f"model.multi_modal_projector.linear_1.{w}"] = c[f"fc1.{w}"]
        out[f"model.multi_modal_projector.linear_2.{w}"] = c[f"fc2.{w}"]
    return out


def param_counts(modules_trained, modules_frozen) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, each parameter counted once."""
    seen, tr, fr = set(), 0, 0
    for m in (*modules_trained, *modules_frozen):
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                tr += p.numel()
            else:
                fr += p.numel()
    return tr, fr


# ---------------------------------------------------------------------------------------------- steps
@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    loss_fn: Callable[[], torch.Tensor]  # forward + loss (the loss that backward() runs on)
    after_backward: Callable[[], None]
    loss_scale: float = 1.0  # loss_fn() * loss_scale = mean CE (medtune's recipe sums the CE)
    optimizer: torch.optim.Optimizer | None = None

    def step(self) -> float:
        loss = self.loss_fn()
        loss.backward()
        self.after_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) * self.loss_scale


def medtune_setup(model, batch: dict, autocast: bool, select: bool = True) -> Setup:
    """The step of recipes/vision_finetune.py (``_loss_sum``, ``scale_grads``), one process, no accumulation.

    ``select=False`` projects every position onto the vocabulary (the step before ``output_at``).
    """
    from types import SimpleNamespace

    from torchtune import training

    from medtune.training.loop import answer_logits
    from medtune.training.loss import AnswerCrossEntropy, answer_targets

    state = {}
    ce = AnswerCrossEntropy()

    # what answer_logits reads of the recipe's run (one process)
    run = SimpleNamespace(model=model, device=batch["labels"].device, world_size=1, rank=0)
    loop_batch = {**batch, "images": {"image": batch["images"]}}

    def loss_fn() -> torch.Tensor:  # recipes/vision_finetune.py `_loss_step`
        if select:  # the recipe's own forward
            logits, targets, keep = answer_logits(run, loop_batch, autocast)
            state["n_tok"] = keep.sum()
            return ce(logits, targets[keep])
        targets, keep = answer_targets(batch["labels"])  # every position projected
        with torch.autocast(batch["labels"].device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(
                batch["tokens"], images=loop_batch["images"], image_counts=batch["image_counts"]
            )
        state["n_tok"] = keep.sum()
        return ce(logits, targets)

    def after_backward() -> None:
        training.scale_grads(model, 1 / state["n_tok"].clamp(min=1))

    n_tok = int((shifted_targets(batch["labels"]) != IGNORE_INDEX).sum())
    return Setup(
        "medtune" if select else "medtune_all_logits",
        model,
        loss_fn,
        after_backward,
        loss_scale=1 / max(n_tok, 1),
    )


def hf_setup(model, batch: dict, autocast: bool) -> Setup:
    device = batch["tokens"].device

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(
                input_ids=batch["tokens"], pixel_values=batch["images"], use_cache=False
            ).logits
        targets = shifted_targets(batch["labels"])
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    return Setup("hf_llava", model, loss_fn, lambda: None)


def bare_setup(model, batch: dict, autocast: bool) -> Setup:
    """Encoder -> connector -> manual scatter -> decoder layers, using the modules of a MedVLM copy."""
    device = batch["tokens"].device
    trunk, conn, dec = model.encoders["image"].tower, model.connectors["image"], model.decoder
    prefix = getattr(trunk, "num_prefix_tokens", 1)
    tokens = batch["tokens"]
    is_img = tokens == model.image_token_id
    where = is_img.nonzero(
        as_tuple=True
    )  # precomputed once: (sample, position) of each placeholder
    text_ids = tokens.masked_fill(is_img, 0)
    targets = shifted_targets(batch["labels"])

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            img = conn(trunk.forward_features(batch["images"])[:, prefix:])
            h = dec.tok_embeddings(text_ids)
            h = h.index_put(where, img.reshape(-1, img.shape[-1]).to(h.dtype))
            for layer in dec.layers:
                h = layer(h)
            logits = dec.output(dec.norm(h))
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    return Setup("bare", model, loss_fn, lambda: None)


# ---------------------------------------------------------------------------------------------- main
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or min(8, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    autocast = device.type == "cuda"
    s = make_shape(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} | device {device} | torch.set_num_threads({threads}) -> "
        f"{torch.get_num_threads()} threads | cpu_count {os.cpu_count()} | load(1 min) {load:.2f}"
    )
    print(
        f"precision: {'bf16 autocast, fp32 weights' if autocast else 'fp32'} | AdamW lr {args.lr} | "
        f"warm-up {args.warmup} steps per set-up, then {args.steps} interleaved repetitions"
    )
    print(
        f"LLM: Llama-3 width {s.width}, {s.layers} layers, {s.heads} heads / {s.kv_heads} kv heads, MLP {s.intermediate}, "
        f"vocab {s.vocab}, rope theta {s.rope_base:g} (frozen)"
    )
    print(
        f"encoder: ViT width {s.enc_width}, depth {s.enc_depth}, {s.enc_heads} heads, {s.image_size}px / patch {s.patch} "
        f"({args.encoder_norm} layout) -> {s.image_tokens} image tokens; connector: 2-layer GELU MLP "
        f"{s.enc_width}->{s.width}->{s.width} (trained)"
    )
    print(
        f"batch {s.batch} x {s.seq_len} tokens ({s.image_tokens} image + {s.seq_len - s.image_tokens} text, "
        f"{s.answer_tokens} answer tokens with loss), 1 image per sample"
    )

    torch.manual_seed(args.seed)
    med = build_medtune(s, args.encoder_norm).to(device)
    bare = copy.deepcopy(med)
    hf = build_hf_llava(s)
    same_weights = args.encoder_norm == "clip"
    if same_weights:
        missing, unexpected = hf.load_state_dict(medtune_to_hf_state(med, s), strict=False)
        unexpected = list(unexpected)
        left = sorted(k for k in missing if "post_layernorm" not in k)
        if left or unexpected:
            raise SystemExit(
                f"weight copy medtune -> HF failed: missing {left[:5]}, unexpected {unexpected[:5]}"
            )
    hf.to(device)
    batch = make_batch(s, device, args.seed)

    # parameter counts
    counts = {
        "medtune": param_counts([med.encoders, med.connectors], [med.decoder]),
        "hf_llava": param_counts(
            [hf.model.vision_tower, hf.model.multi_modal_projector],
            [hf.model.language_model, hf.lm_head],
        ),
        "bare": param_counts([bare.encoders, bare.connectors], [bare.decoder]),
    }
    ref_tr, ref_fr = counts["medtune"]
    # allowed: 0.1%, or the known structural difference (CLIP's unused post_layernorm, 2 x encoder width)
    tol_tr, tol_fr = max(PARAM_TOLERANCE * ref_tr, 2 * s.enc_width), PARAM_TOLERANCE * ref_fr
    print(
        f"\n{'set-up':<10} {'trainable':>12} {'frozen':>12}  diff vs medtune (tolerance: trainable +-{tol_tr:,.0f}, "
        f"frozen +-{tol_fr:,.0f})"
    )
    for name, (tr, fr) in counts.items():
        print(f"{name:<10} {tr:>12,} {fr:>12,}  {tr - ref_tr:+,} / {fr - ref_fr:+,}")
        if abs(tr - ref_tr) > tol_tr or abs(fr - ref_fr) > tol_fr:
            raise SystemExit(f"{name}: parameter counts differ from medtune's beyond the tolerance")
    if counts["hf_llava"][0] != ref_tr:
        print(
            f"  (hf_llava's extra trainable params: CLIP post_layernorm, 2 x {s.enc_width}, unused by LLaVA's "
            f"feature path{'' if same_weights else '; minus the patch-embedding bias timm has'})"
        )

    setups = [
        medtune_setup(med, batch, autocast),
        hf_setup(hf, batch, autocast),
        bare_setup(bare, batch, autocast),
        medtune_setup(copy.deepcopy(med), batch, autocast, select=False),
    ]
    for st in setups:
        st.model.train()
        params = [p for p in st.model.parameters() if p.requires_grad]
        st.optimizer = torch.optim.AdamW(params, lr=args.lr)

    # step-0 loss (same weights: same loss expected)
    with torch.no_grad():
        losses = {st.name: float(st.loss_fn()) * st.loss_scale for st in setups}
    print("\nstep-0 loss (mean CE): " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    if same_weights:
        tol = 2e-2 if autocast else 1e-4
        worst = max(abs(v - losses["medtune"]) for v in losses.values())
        print(
            f"  max |diff| {worst:.2e} (tolerance {tol:g}): {'same function' if worst <= tol else 'MISMATCH'}"
        )
        if worst > tol:
            raise SystemExit("the three set-ups do not compute the same loss from the same weights")

    for _ in range(args.warmup):
        for st in setups:
            st.step()
    sync(device)

    times: dict[str, list[float]] = {st.name: [] for st in setups}
    last_loss: dict[str, float] = {}
    for rep in range(args.steps):
        k = rep % len(setups)
        for st in setups[k:] + setups[:k]:
            sync(device)
            t0 = time.perf_counter()
            last_loss[st.name] = st.step()
            sync(device)
            times[st.name].append(time.perf_counter() - t0)
        print(
            f"  rep {rep + 1}/{args.steps}: "
            + ", ".join(f"{n} {1000 * v[-1]:.0f} ms" for n, v in times.items()),
            file=sys.stderr,
            flush=True,
        )

    med_ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    load2 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nstep time over {args.steps} interleaved repetitions (load(1 min) now {load2:.2f}):")
    for name, v in times.items():
        print(
            f"{name:<18} {med_ms[name]:9.1f} ms/step  (median; min {1000 * min(v):.1f}, max {1000 * max(v):.1f}; "
            f"last loss {last_loss[name]:.4f})"
        )
    print(f"medtune/hf_llava = {med_ms['medtune'] / med_ms['hf_llava']:.2f}x")
    print(f"medtune/bare = {med_ms['medtune'] / med_ms['bare']:.2f}x")
    print(
        f"medtune/medtune_all_logits = {med_ms['medtune'] / med_ms['medtune_all_logits']:.2f}x  "
        "(logits at answer positions only vs at every position)"
    )
    paired = {
        o: statistics.median(a / b for a, b in zip(times["medtune"], times[o]))
        for o in ("hf_llava", "bare")
    }
    print(
        f"(median of per-repetition ratios, less sensitive to load drift: medtune/hf_llava {paired['hf_llava']:.2f}x, "
        f"medtune/bare {paired['bare']:.2f}x; ratio of minima: medtune/hf_llava "
        f"{min(times['medtune']) / min(times['hf_llava']):.2f}x, medtune/bare {min(times['medtune']) / min(times['bare']):.2f}x)"
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for st in setups:
            with profile(activities=acts) as prof:
                for _ in range(args.profile):
                    st.step()
                sync(device)
            print(f"\n--- profile: {st.name}, {args.profile} steps ---")
            print(
                prof.key_averages().table(
                    sort_by="self_cpu_time_total"
                    if device.type == "cpu"
                    else "self_cuda_time_total",
                    row_limit=20,
                )
            )
    return med_ms


if __name__ == "__main__":
    main()
