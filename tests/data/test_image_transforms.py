"""medtune.data.image_transforms: resize modes, normalization, augmentation drawn from a generator."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.image_transforms import CLIP_MEAN, CLIP_STD, image_transform


def test_transform_shape_and_normalization():
    t = image_transform(224, CLIP_MEAN, CLIP_STD)
    x = t(Image.new("RGB", (300, 200), (255, 128, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expect = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 100, 100], expect.float())
    assert image_transform((64, 32), CLIP_MEAN, CLIP_STD)(Image.new("L", (10, 10))).shape == (
        3,
        64,
        32,
    )


def test_transform_resize_modes():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    pad = image_transform(64, CLIP_MEAN, CLIP_STD, resize_mode="pad")(img)
    assert torch.allclose(pad[:, 0, 32], torch.zeros(3), atol=0.02)  # pad rows = mean colour
    assert pad[0, 32, 32] > 1.5
    crop = image_transform(64, CLIP_MEAN, CLIP_STD, resize_mode="crop")(img)
    assert (crop > 1.5).all()
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(64, CLIP_MEAN, CLIP_STD, resize_mode="stretch")


def _half_bright():
    a = np.zeros((128, 128, 3), np.uint8)
    a[:, :64] = 220
    return Image.fromarray(a)


def test_transform_deterministic_eval_and_picklable():
    img = _half_bright()
    t = image_transform(64, CLIP_MEAN, CLIP_STD, augment={"rotation": 30})  # ignored: train False
    assert torch.equal(t(img), t(img))
    t2 = pickle.loads(pickle.dumps(t))
    assert torch.equal(t(img), t2(img))


def test_train_augmentation_random_seeded_no_flip():
    img = _half_bright()
    ev = image_transform(64, CLIP_MEAN, CLIP_STD)(img)
    tr = image_transform(64, CLIP_MEAN, CLIP_STD, train=True)
    torch.manual_seed(0)
    a = tr(img)
    torch.manual_seed(0)
    b = tr(img)
    assert torch.equal(a, b) and not torch.equal(a, ev)
    for _ in range(20):  # never flipped: the left half stays the bright one
        x = tr(img)
        assert x[:, :, :24].mean() > x[:, :, 40:].mean() + 1.0
    off = image_transform(
        64,
        CLIP_MEAN,
        CLIP_STD,
        train=True,
        augment={"crop_scale": None, "rotation": 0, "brightness": 0, "contrast": 0},
    )
    assert torch.equal(off(img), ev)
    flip = image_transform(
        64,
        CLIP_MEAN,
        CLIP_STD,
        train=True,
        augment={"hflip": 1.0, "crop_scale": None, "rotation": 0, "brightness": 0, "contrast": 0},
    )
    assert torch.equal(flip(img), torch.flip(ev, dims=[2]))
    with pytest.raises(ValueError, match="unknown augmentation key"):
        image_transform(64, CLIP_MEAN, CLIP_STD, train=True, augment={"vflip": 0.5})


def test_augmentation_draws_only_from_the_given_generator():
    img = _half_bright()
    tr = image_transform(64, CLIP_MEAN, CLIP_STD, train=True, augment={"hflip": 0.5})
    state = torch.get_rng_state()
    a = tr(img, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG does not matter
    b = pickle.loads(pickle.dumps(tr))(img, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    tr(img, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG
    outs = [tr(img, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert len({o.sum().item() for o in outs}) == 8  # seeds give different augmentations
