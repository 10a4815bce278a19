"""Packing: packed batches train exactly like unpacked ones, and no token sees another sample."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchtune.modules.attention_utils import create_block_causal_mask

from medtune.data.collate import collate_vision_chat
from medtune.data.errors import DataError
from medtune.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    attention_mask,
    collate_packed,
    dense_block_causal_mask,
    pack_indices,
)
from medtune.testing.packing import random_medvlm, synthetic_item
from medtune.training.loss import answer_loss_sum

ANSWERS = [5, 17, 3, 30, 9, 12, 2]  # answer lengths; n_images below gives 0-2 images per sample
N_IMAGES = [1, 2, 0, 1, 1, 2, 1]
MAX_LEN = 160


@pytest.fixture(scope="module")
def model():
    m = random_medvlm(width=32, layers=2, image_tokens=8)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


@pytest.fixture(scope="module")
def items(model):
    return [
        synthetic_item(model, i, answer_len=a, n_images=k, question_len=3 + i)
        for i, (a, k) in enumerate(zip(ANSWERS, N_IMAGES))
    ]


def _loss(model, batch, packed: bool) -> torch.Tensor:
    kw = {}
    if packed:
        kw = {"mask": attention_mask(batch, "cpu"), "input_pos": batch["input_pos"]}

    def forward():
        return model(
            batch["tokens"], images=batch["images"], image_counts=batch["image_counts"], **kw
        )

    loss, n = answer_loss_sum(forward, model.decoder, batch["labels"], autocast=False)
    return loss / n


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed(items, max_len=MAX_LEN, seq_len=None):
    lengths = [len(x["tokens"]) for x in items]
    packs = pack_indices(lengths, max_len, shuffle=False)
    assert len(packs) < len(items)  # several samples share a row
    return packs, collate_packed([[items[i] for i in p] for p in packs], pad_id=0, seq_len=seq_len)


def test_packed_loss_and_gradients_equal_unpacked(model, items):
    packs, packed = _packed(items, seq_len=MAX_LEN)
    assert packed["tokens"].shape == (len(packs), MAX_LEN)
    order = [i for p in packs for i in p]
    unpacked = collate_vision_chat([items[i] for i in order], pad_id=0)

    loss_u = _loss(model, unpacked, packed=False)
    grads_u = _grads(model, loss_u)
    loss_p = _loss(model, packed, packed=True)
    grads_p = _grads(model, loss_p)

    torch.testing.assert_close(loss_p, loss_u)
    # every parameter gets a gradient (all parts train here) and they agree
    assert set(grads_u) == {n for n, _ in model.named_parameters()} == set(grads_p)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], msg=name)
    # and the answer-token count is the same: no target lost or added at pack boundaries
    n_u = (unpacked["labels"][:, 1:] != IGNORE_INDEX).sum()
    n_p = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert int(n_u) == int(n_p) == sum(ANSWERS)


def test_no_token_attends_across_samples(model, items):
    """Changing the first sample of a row (its text and its image) leaves every later sample's
    logits bit-identical; the changed sample's own logits do change."""
    packs, batch = _packed(items)
    row = next(r for r, p in enumerate(packs) if len(p) >= 2 and N_IMAGES[p[0]] > 0)
    first = packs[row][0]
    n_first = len(items[first]["tokens"])
    tokens = batch["tokens"].clone()
    text = (tokens[row, :n_first] != model.image_token_id).nonzero().flatten()[1:]  # keep bos
    tokens[row, text] = (tokens[row, text] + 1) % model.image_token_id
    images = {k: v.clone() for k, v in batch["images"].items()}
    img0 = int(batch["image_counts"][:row].sum())  # the row's first image is the first sample's
    images["image"][img0] += 1.0
    mask = attention_mask(batch, "cpu")
    with torch.no_grad():
        kw = {"image_counts": batch["image_counts"], "mask": mask, "input_pos": batch["input_pos"]}
        a = model(batch["tokens"], images=batch["images"], **kw)
        b = model(tokens, images=images, **kw)
    real = int(sum(len(items[i]["tokens"]) for i in packs[row]))
    torch.testing.assert_close(b[row, n_first:real], a[row, n_first:real], rtol=0, atol=0)
    assert not torch.allclose(b[row, :n_first], a[row, :n_first])
    others = [r for r in range(len(packs)) if r != row]
    torch.testing.assert_close(b[others], a[others], rtol=0, atol=0)


def test_positions_restart_and_labels_stop_at_boundaries(items):
    packs, batch = _packed(items, seq_len=MAX_LEN)
    for r, pack in enumerate(packs):
        at = 0
        for i in pack:
            n = len(items[i]["tokens"])
            assert batch["input_pos"][r, at : at + n].tolist() == list(range(n))
            assert batch["tokens"][r, at : at + n].tolist() == items[i]["tokens"]
            want = [IGNORE_INDEX] + items[i]["labels"][1:]
            assert batch["labels"][r, at : at + n].tolist() == want
            at += n
        assert batch["labels"][r, at:].eq(IGNORE_INDEX).all()
        assert batch["input_pos"][r, at:].eq(0).all()
    assert batch["ids"] == [items[i]["id"] for p in packs for i in p]
    assert batch["image_counts"].tolist() == [sum(N_IMAGES[i] for i in p) for p in packs]
    assert batch["samples_per_row"].tolist() == [len(p) for p in packs]
    want_img = torch.cat([items[i]["images"]["image"] for p in packs for i in p])
    torch.testing.assert_close(batch["images"]["image"], want_img, rtol=0, atol=0)


def test_mask_is_torchtunes_block_causal_mask_with_lone_padding():
    seq_lens = [[3, 2, 1, 1], [4, 3]]
    mask = dense_block_causal_mask(seq_lens, 7)
    want = create_block_causal_mask([torch.tensor(x) for x in seq_lens])
    assert torch.equal(mask, want)
    assert mask.any(dim=-1).all()  # no empty row (padding attends to itself)
    assert mask[0, 5].tolist() == [False] * 5 + [True, False]  # a padding token sees only itself
    batch = collate_packed(
        [[{"tokens": [1, 2, 3], "labels": [-100, 2, 3], "images": {}, "n_images": 0, "id": 0}]],
        pad_id=9,
        seq_len=5,
    )
    assert [x.tolist() for x in batch["seq_lens"]] == [[3, 1, 1]]
    assert torch.equal(batch["mask"], dense_block_causal_mask([[3, 1, 1]], 5))
    assert torch.equal(attention_mask({**batch, "mask": None}, "cpu"), batch["mask"])


def test_pack_indices_fits_deterministically_and_refuses_too_long():
    lengths = [50, 90, 10, 60, 40, 100, 5, 45]
    packs = pack_indices(lengths, 100, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 100 for p in packs)
    assert pack_indices(lengths, 100, seed=3) == packs
    assert pack_indices(lengths, 100, seed=4) != packs
    # in index order: first fit over the open packs, or next fit with a window of one
    assert pack_indices(lengths, 100, shuffle=False) == [[0, 2, 4], [1, 6], [3], [5], [7]]
    assert pack_indices(lengths, 100, shuffle=False, open_packs=1) == [
        [0],
        [1, 2],
        [3, 4],
        [5],
        [6, 7],
    ]
    with pytest.raises(DataError, match="sample 5: 100 tokens do not fit .*max_seq_len=99"):
        pack_indices(lengths, 99)


def test_packed_dataset_shuffles_by_epoch_and_resumes_by_skipping_batches(items):
    ds = PackedDataset(items, 100, seed=0)
    assert ds.lengths == [len(x["tokens"]) for x in items]
    assert 0 < ds.fill() <= 1

    def batches(epoch: int, skip: int = 0):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * 2 :]
        loader = DataLoader(
            ds, batch_size=2, sampler=order, collate_fn=lambda p: collate_packed(p, pad_id=0)
        )
        return [b["ids"] for b in loader]

    full = batches(0)
    assert sorted(i for b in full for i in b) == sorted(x["id"] for x in items)
    assert batches(0) == full
    assert batches(0, skip=1) == full[1:]
    assert batches(1) != full


def test_token_lengths_of_a_vision_chat_dataset_match_its_items(tiny_assets):
    """Lengths come from the transform without loading images, per epoch's sampled templates."""
    import numpy as np
    from PIL import Image

    from medtune.data.model_transform import MedVLMTransform, VisionChatDataset
    from medtune.data.packing import token_lengths
    from medtune.data.sample import Message, Sample
    from medtune.models.llama3 import llama3_tokenizer

    tok = llama3_tokenizer(str(tiny_assets / "llama3_tiny" / "original" / "tokenizer.model"))
    tf = MedVLMTransform(
        tok,
        image_token_id=tok.special_tokens["<|reserved_special_token_0|>"],
        tokens_per_image=3,
        image_transforms={"clip": {"image_size": 16}},
        prompt_template=["{question}", "Look at the image and answer briefly: {question}"],
    )
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    samples = [
        Sample(f"s{i}", [img], [Message("user", "Which side?"), Message("assistant", "l" * i)], {})
        for i in range(6)
    ]
    ds = VisionChatDataset(samples, tf, train=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert token_lengths(ds, epoch=epoch) == [len(ds[i]["tokens"]) for i in range(len(ds))]
    assert token_lengths(ds, epoch=0) != token_lengths(ds, epoch=1)  # templates differ by epoch
    packed = PackedDataset(ds, 64, seed=0)
    batch = collate_packed([packed[p] for p in range(len(packed))], pad_id=tok.pad_id)
    assert sorted(batch["ids"]) == [s.id for s in samples]
    assert int(batch["image_counts"].sum()) == 6 and batch["images"]["clip"].shape[0] == 6
