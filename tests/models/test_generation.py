"""``medtune.generation.generate``: batched == one at a time, KV cache == recompute, both equal to a
naive greedy loop over full forwards; stop tokens, padding, sampling and plain Llama-3."""

from __future__ import annotations

import pytest
import torch

from medtune.generation import generate, sample_next
from medtune.models.builders import medvlm
from medtune.models.encoders import open_clip_vision
from medtune.models.llama3 import llama3_tiny

VOCAB = 512
IMG_ID = VOCAB - 256 + 4  # any reserved id above the text ids used below


@pytest.fixture(scope="module")
def model(tiny_assets):
    """A random MedVLM (tiny open_clip tower + MLP + 2-layer Llama-3) whose greedy outputs vary."""
    torch.manual_seed(0)
    dec = llama3_tiny(
        vocab_size=VOCAB,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        max_seq_len=256,
    )
    enc = open_clip_vision(str(tiny_assets / "tiny_clip"))
    return medvlm(dec, enc, connector="mlp", image_token_id=IMG_ID).eval()


def _prompts(model, n_images: list[int], seed: int = 0):
    """Prompts of different lengths, each with its images' placeholders, and the images."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i, k in enumerate(n_images):
        p = torch.randint(0, 200, (3 + 2 * i,), generator=g).tolist()
        for _ in range(k):
            p += [IMG_ID] * model.tokens_per_image + torch.randint(
                0, 200, (2,), generator=g
            ).tolist()
        prompts.append(p)
    size = model.image_transforms["image"]["image_size"]
    images = torch.randn(sum(n_images), 3, size, size, generator=g)
    return prompts, {"image": images}, torch.tensor(n_images)


def _naive_greedy(model, prompt: list[int], images, n_new: int) -> list[int]:
    """Full forward over the whole sequence at every step, argmax of the last position."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            kw = {"images": images, "image_counts": None} if images is not None else {}
            logits = model(torch.tensor([seq]), **kw)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def _split_images(images, counts):
    starts = torch.cumsum(counts, 0) - counts
    return [
        {"image": images["image"][int(s) : int(s) + int(c)]} if int(c) else None
        for s, c in zip(starts, counts)
    ]


def test_batched_cached_greedy_equals_naive_loop_per_prompt(model):
    prompts, images, counts = _prompts(model, [1, 0, 2])
    n_new = 6
    batched = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[],
        images=images,
        image_counts=counts,
        max_new_tokens=n_new,
    )
    per = _split_images(images, counts)
    naive = [_naive_greedy(model, p, im, n_new) for p, im in zip(prompts, per)]
    assert batched == naive
    assert len({tuple(o) for o in batched}) > 1  # the rows differ: a mix-up between rows would show
    singles = [
        generate(
            model,
            [p],
            pad_id=0,
            stop_tokens=[],
            images=im,
            image_counts=torch.tensor([int(c)]),
            max_new_tokens=n_new,
        )[0]
        for p, im, c in zip(prompts, per, counts)
    ]
    assert singles == batched
    no_cache = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[],
        images=images,
        image_counts=counts,
        max_new_tokens=n_new,
        use_cache=False,
    )
    assert no_cache == batched


def test_stop_tokens_end_rows_and_are_not_returned(model):
    prompts, images, counts = _prompts(model, [1, 1], seed=1)
    free = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[],
        images=images,
        image_counts=counts,
        max_new_tokens=5,
    )
    stop = free[0][2]  # row 0's third token becomes a stop token
    out = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[stop],
        images=images,
        image_counts=counts,
        max_new_tokens=5,
    )
    first = free[0].index(stop)
    assert out[0] == free[0][:first]
    cut = free[1].index(stop) if stop in free[1] else 5
    assert out[1] == free[1][:cut]
    # the model is left without caches: a plain forward afterwards works
    assert model(torch.tensor([prompts[1][:4]])).shape == (1, 4, VOCAB)


def test_plain_llama3_decoder_and_seeded_sampling(model):
    dec = model.decoder
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    greedy = generate(dec, prompts, pad_id=0, stop_tokens=[], max_new_tokens=4)
    assert greedy == [_naive_greedy(dec, p, None, 4) for p in prompts]
    a = generate(
        dec,
        prompts,
        pad_id=0,
        stop_tokens=[],
        max_new_tokens=8,
        temperature=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    b = generate(
        dec,
        prompts,
        pad_id=0,
        stop_tokens=[],
        max_new_tokens=8,
        temperature=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    assert a == b and a != greedy
    top1 = generate(
        dec,
        prompts,
        pad_id=0,
        stop_tokens=[],
        max_new_tokens=4,
        temperature=1.0,
        top_k=1,
        generator=torch.Generator().manual_seed(3),
    )
    assert top1 == greedy  # top-k 1 is greedy whatever the temperature


def test_sample_next_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert int(sample_next(logits, 0.0)) == 0
