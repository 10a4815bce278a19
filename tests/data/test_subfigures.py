"""medtune.data.subfigures: one sample per subfigure box; crops; bad rows named by file and row;
and medtune.training.blip_data's image ids (each subfigure its own image) and pre_caption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medtune.data.errors import DataError
from medtune.data.subfigures import load_crop, subfigure_json


@pytest.fixture
def figure_dir(tmp_path):
    left = np.zeros((20, 30, 3), dtype=np.uint8)
    right = np.full((20, 30, 3), 200, dtype=np.uint8)
    Image.fromarray(np.concatenate([left, right], axis=1)).save(tmp_path / "fig.png")
    rows = [
        {
            "id": "PMC1_fig2",
            "image": "fig.png",
            "caption": "Axial MRI.",
            "subfigures": [
                {"box": [0, 0, 30, 20], "subcaption": "(A) T2: a LESION.", "label": "a"},
                {"box": [30, 0, 60, 20], "subcaption": "(B) normal"},
            ],
        }
    ]
    (tmp_path / "sub.json").write_text(json.dumps(rows))
    return tmp_path


def test_one_sample_per_box_with_its_crop_and_subcaption(figure_dir):
    samples = subfigure_json(figure_dir / "sub.json")
    assert [s.id for s in samples] == ["PMC1_fig2/0", "PMC1_fig2/1"]
    assert samples[0].meta["caption"] == "(A) T2: a LESION." and samples[0].meta["label"] == "a"
    assert samples[1].meta["figure_caption"] == "Axial MRI."
    a, b = load_crop(samples[0]), load_crop(samples[1])
    assert a.size == b.size == (30, 20)
    assert np.asarray(a).max() == 0 and np.asarray(b).min() == 200

    from medtune.training.blip_data import BlipPairs, pre_caption

    pairs = BlipPairs(samples, {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert pairs.image_ids == [0, 1] and pairs.n_images == 2
    assert pairs.captions[0] == "a t2 a lesion"
    assert pre_caption("One two three four", max_words=2) == "one two"
    assert tuple(pairs[1][1].shape) == (3, 16, 16)


@pytest.mark.parametrize(
    "sub, match",
    [
        (
            {"box": [0, 0, 0, 20], "subcaption": "x"},
            r"row 0 \(id PMC1_fig2\).*box is \[0, 0, 0, 20\]",
        ),
        ({"box": [0, 0, 10], "subcaption": "x"}, r"subfigures\[0\]\.box"),
        ({"box": [0, 0, 10, 10], "subcaption": " "}, r"subfigures\[0\]\.subcaption"),
        ("not an object", r"subfigures\[0\] is str"),
    ],
)
def test_bad_boxes_and_subcaptions_name_file_and_row(figure_dir, sub, match):
    rows = [{"id": "PMC1_fig2", "image": "fig.png", "subfigures": [sub]}]
    (figure_dir / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=match) as e:
        subfigure_json(figure_dir / "bad.json")
    assert "bad.json" in str(e.value)


def test_a_box_outside_the_figure_is_named_when_loaded(figure_dir):
    rows = [{"image": "fig.png", "subfigures": [{"box": [0, 0, 61, 20], "subcaption": "x"}]}]
    (figure_dir / "out.json").write_text(json.dumps(rows))
    (sample,) = subfigure_json(figure_dir / "out.json")
    with pytest.raises(DataError, match=r"sample out-0/0: crop box \[0, 0, 61, 20\].*60 x 20"):
        load_crop(sample)
    assert len(subfigure_json(figure_dir / "out.json", skip_bad_rows=True)) == 1
