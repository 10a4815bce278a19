"""medtune.data.model_transform: one model transform for training and inference, seeded per item."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.model_transform import (
    IGNORE_INDEX,
    MedVLMTransform,
    VisionChatDataset,
    medvlm_transform,
)
from medtune.data.sample import Message, Sample

TF = {"clip": {"image_size": 16}}
AUG = {"rotation": 20.0, "brightness": 0.3, "hflip": 0.5}


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from medtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(str(tiny_assets / "llama3_tiny" / "original" / "tokenizer.model"))


def _sample(i: int = 0, answer: str = "left") -> Sample:
    arr = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    return Sample(
        f"s{i}",
        [Image.fromarray(arr)],
        [Message("user", "Which side?"), Message("assistant", answer)],
        {},
    )


def _transform(tokenizer, **kw) -> MedVLMTransform:
    return MedVLMTransform(
        tokenizer, image_token_id=tokenizer.special_tokens["<|reserved_special_token_0|>"],
        tokens_per_image=3, image_transforms=TF, **kw,
    )  # fmt: skip


def test_inference_drops_the_answer_and_opens_the_assistant_turn(tokenizer):
    tf = _transform(tokenizer)
    train = tf(_sample())
    infer = tf(_sample(), inference=True)
    header = [
        tokenizer.start_header_id,
        *tokenizer.encode("assistant", add_bos=False, add_eos=False),
        tokenizer.end_header_id,
    ]
    # the inference ids are the training ids up to (and including) the assistant header + "\n\n"
    assert train["tokens"][: len(infer["tokens"])] == infer["tokens"]
    assert infer["tokens"][-len(header) - 1 : -1] == header
    assert set(infer["labels"]) == {IGNORE_INDEX}
    targets = [t for t in train["labels"] if t != IGNORE_INDEX]
    assert targets == tokenizer.encode("left", add_bos=False, add_eos=False) + [tokenizer.eot_id]
    assert train["tokens"].count(tf.image_token_id) == 3 and train["n_images"] == 1
    assert train["images"]["clip"].shape == (1, 3, 16, 16)
    assert torch.equal(train["images"]["clip"], infer["images"]["clip"])


def test_augmentation_depends_on_seed_epoch_index_only(tokenizer):
    tf = _transform(tokenizer, augment=AUG, seed=3)
    torch.manual_seed(0)
    random.seed(0)
    a = tf(_sample(), train=True, epoch=1, index=5)["images"]["clip"]
    state = torch.get_rng_state()
    py_state = random.getstate()
    torch.manual_seed(12345)  # another global state: same item
    b = tf(_sample(), train=True, epoch=1, index=5)["images"]["clip"]
    torch.set_rng_state(state)
    assert torch.equal(a, b)
    tf(_sample(), train=True, epoch=1, index=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNGs are not drawn from
    assert random.getstate() == py_state
    others = [
        tf(_sample(), train=True, epoch=e, index=i)["images"]["clip"] for e, i in ((2, 5), (1, 6))
    ]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, _transform(tokenizer, augment=AUG, seed=4)(
        _sample(), train=True, epoch=1, index=5)["images"]["clip"])  # fmt: skip
    plain = tf(_sample(), train=False)["images"]["clip"]
    assert torch.equal(plain, _transform(tokenizer)(_sample())["images"]["clip"])


def test_template_sampling_is_per_item_and_reproducible(tokenizer):
    templates = ["Q: {question}", "Please answer. {question}", "{question} Short answer."]
    tf = _transform(tokenizer, prompt_template=templates, seed=1)
    firsts = [tf(_sample(), epoch=0, index=i)["tokens"] for i in range(12)]
    again = [tf(_sample(), epoch=0, index=i)["tokens"] for i in range(12)]
    assert firsts == again
    assert len({tuple(t) for t in firsts}) > 1  # several templates were drawn


def test_dataset_items_are_transform_calls(tokenizer):
    samples = [_sample(i) for i in range(4)]
    tf = _transform(tokenizer, augment=AUG, seed=2)
    ds = VisionChatDataset(samples, tf, train=True)
    ds.set_epoch(3)
    for i in range(4):
        want = tf(samples[i], train=True, epoch=3, index=i)
        item = ds[i]
        assert item["tokens"] == want["tokens"] and item["labels"] == want["labels"]
        assert torch.equal(item["images"]["clip"], want["images"]["clip"])


def test_medvlm_transform_bare_llm_has_no_image_tokens(tokenizer):
    class Bare:  # a decoder: no encoders attribute
        pass

    tf = medvlm_transform(Bare(), tokenizer, system_prompt="Be brief.")
    assert tf.tokens_per_image == 0 and tf.eval_transforms == {}
    item = tf(Sample("t", [], [Message("user", "hi")], {}), inference=True)
    assert item["images"] == {} and item["n_images"] == 0
    sys_ids = tokenizer.encode("Be brief.", add_bos=False, add_eos=False)
    assert item["tokens"][5 : 5 + len(sys_ids)] == sys_ids  # bos, header(system), "\n\n", text
