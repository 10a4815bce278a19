"""Random MedVLMs and synthetic dataset items for the packing tests and benchmarks (no files)."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def random_medvlm(
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_base: int = 256,
    image_size: int = 32,
    enc_width: int = 32,
    enc_depth: int = 1,
    image_tokens: int = 32,
    max_seq_len: int = 2048,
    seed: int = 0,
):
    """A random MedVLM: timm ViT (pooled) -> ``pooled_unfold`` to ``image_tokens`` -> tiny Llama-3.

    The 32-token prefix is medcap's design (BiomedCLIP's pooled embedding unfolded to 32 tokens),
    which makes image tokens a small, fixed part of each sample as in report data.

    Returns:
        the model (fp32, random weights, train mode).
    """
    from medtune.models.builders import image_token_id_for_vocab, medvlm
    from medtune.models.encoders import timm_vision
    from medtune.models.llama3 import llama3_tiny

    torch.manual_seed(seed)
    vocab = vocab_base + 256
    dec = llama3_tiny(
        vocab,
        embed_dim=width,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_dim=intermediate or width * 2,
        max_seq_len=max_seq_len,
    )
    enc = timm_vision(
        "vit_tiny_patch16_224",
        output="pooled",
        image_size=image_size,
        patch_size=16,
        depth=enc_depth,
        embed_dim=enc_width,
        num_heads=max(1, enc_width // 32),
    )
    return medvlm(
        dec,
        enc,
        connector="pooled_unfold",
        connector_kwargs={"num_tokens": image_tokens},
        image_token_id=image_token_id_for_vocab(vocab),
    )


def report_lengths(n: int, *, seed: int = 0, low: int = 20, high: int = 250) -> list[int]:
    """Target lengths of report-like answers: ``low`` to ``high`` tokens, skewed short
    (exponential with mean ``(high - low) / 4`` above ``low``, clipped)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    x = low - torch.log1p(-u) * (high - low) / 4
    return x.clamp(max=high).long().tolist()


def synthetic_item(
    model,
    index: int,
    *,
    answer_len: int,
    question_len: int = 12,
    n_images: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """One dataset item shaped like :class:`medtune.data.model_transform.VisionChatDataset`'s.

    Layout: [bos, images (placeholders), question, answer]; labels are the answer tokens.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    img_id, n_tok = model.image_token_id, model.tokens_per_image
    text = lambda k: torch.randint(1, img_id - 2, (k,), generator=g).tolist()  # noqa: E731
    prompt = [0] + [img_id] * (n_tok * n_images) + text(question_len)
    answer = text(answer_len)
    size = next(iter(model.image_transforms.values()))["image_size"]
    images = {
        name: torch.randn(n_images, 3, size, size, generator=g) for name in model.image_transforms
    }
    return {
        "tokens": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "images": images,
        "n_images": n_images,
        "id": f"s{index}",
    }
