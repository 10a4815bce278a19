"""medtune.data.holdout: a seeded by-image hold-out (no image on both sides), through any reader."""

from __future__ import annotations

import shutil

import pytest

from medtune.data import Message, Sample, vqa_rad
from medtune.data.errors import BadValueError
from medtune.data.holdout import holdout, holdout_groups


def _samples(tmp_path, n_images=40, per_image=3):
    out = []
    for k in range(n_images):
        path = tmp_path / f"img{k}" / "source.jpg"  # same basename everywhere, as in SLAKE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        for q in range(per_image):
            out.append(
                Sample(
                    f"{k}-{q}",
                    [str(path)],
                    [Message("user", "q"), Message("assistant", "a")],
                    {"split": "train"},
                )
            )
    return out


def _images(samples):
    return {p for s in samples for p in s.image_paths}


def test_no_image_on_both_sides_and_sizes_add_up(tmp_path):
    samples = _samples(tmp_path)
    train = holdout(samples, 0.2, seed=3, split="train")
    val = holdout(samples, 0.2, seed=3, split="validation")
    assert not _images(train) & _images(val)
    assert len(train) + len(val) == len(samples)
    assert sorted(s.id for s in train + val) == sorted(s.id for s in samples)
    assert len(_images(val)) == 8 and len(val) == 24  # 0.2 of 40 images, 3 questions each
    assert [s.id for s in train] == [s.id for s in samples if s.id in {t.id for t in train}]
    assert {s.meta["split"] for s in val} == {"validation"}
    assert {s.meta["holdout_of"] for s in val} == {"train"}
    assert {s.meta["split"] for s in train} == {"train"} and "holdout_of" not in train[0].meta
    assert samples[0].meta == {"split": "train"}  # the input is not modified


def test_deterministic_by_seed_and_independent_of_location(tmp_path):
    samples = _samples(tmp_path / "a")
    ids = [s.id for s in holdout(samples, 0.25, seed=1, split="validation")]
    assert ids == [s.id for s in holdout(samples, 0.25, seed=1, split="validation")]
    assert ids != [s.id for s in holdout(samples, 0.25, seed=2, split="validation")]
    moved = _samples(tmp_path / "elsewhere" / "deeper")
    assert ids == [s.id for s in holdout(moved, 0.25, seed=1, split="validation")]


def test_samples_sharing_any_image_stay_together(tmp_path):
    samples = _samples(tmp_path, n_images=6, per_image=1)
    # one sample with two images links img0 and img1 into one group
    samples.append(Sample("pair", [samples[0].images[0], samples[1].images[0]]))
    samples.append(Sample("text-only"))
    groups = holdout_groups(samples)
    assert len(groups) == 6  # img0+img1+pair, img2..img5, text-only
    for seed in range(10):
        val = holdout(samples, 0.5, seed=seed, split="validation")
        train = holdout(samples, 0.5, seed=seed, split="train")
        assert not _images(train) & _images(val)
        assert len(train) + len(val) == len(samples)


def test_bad_arguments(tmp_path):
    samples = _samples(tmp_path, n_images=3)
    for fraction in (0, 1, 1.5, -0.1, "0.1", True):
        with pytest.raises(BadValueError, match="holdout_fraction"):
            holdout(samples, fraction)
    with pytest.raises(BadValueError, match="holdout_split"):
        holdout(samples, 0.5, split="test")
    with pytest.raises(BadValueError, match="cannot hold out"):
        holdout(samples[:1], 0.5)


def test_through_the_reader_arguments(vqa_rad_dir, tmp_path):
    full = vqa_rad(vqa_rad_dir, "train")
    kw = {"holdout_fraction": 0.3, "holdout_seed": 0}
    train = vqa_rad(vqa_rad_dir, "train", **kw, holdout_split="train")
    val = vqa_rad(vqa_rad_dir, "train", **kw, holdout_split="validation")
    assert len(train) + len(val) == len(full) and len(val) > 0 and len(train) > 0
    assert not {s.meta["image"] for s in train} & {s.meta["image"] for s in val}
    assert vqa_rad(vqa_rad_dir, "train", **kw) == train  # holdout_split defaults to train
    copy = shutil.copytree(vqa_rad_dir, tmp_path / "moved")
    assert [s.id for s in vqa_rad(copy, "train", **kw, holdout_split="validation")] == [
        s.id for s in val
    ]
