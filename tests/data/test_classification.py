"""Classification readers (ChestX-ray14, CheXpert, RSNA, SIIM-ACR) on fixtures in the real layouts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from medtune.data import DataError, MissingImageError, load_image
from medtune.data.classification import (
    CHESTXRAY14_CLASSES,
    CHEXPERT_CLASSES,
    chestxray14,
    chexpert,
    rsna_pneumonia,
    siim_acr,
)
from medtune.testing.classification import (
    CHESTXRAY14_FIXTURE,
    RSNA_FIXTURE,
    SIIM_FIXTURE,
    make_chestxray14_fixture,
    make_chexpert_fixture,
    make_rsna_fixture,
    make_siim_fixture,
)


@pytest.fixture(scope="module")
def cxr14(tmp_path_factory):
    return make_chestxray14_fixture(tmp_path_factory.mktemp("cxr14"))


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory):
    return make_chexpert_fixture(tmp_path_factory.mktemp("chexpert"))


@pytest.mark.parametrize("split", ["train_val", "test", None])
def test_chestxray14(cxr14, split):
    items = chestxray14(cxr14, split=split)
    names = CHESTXRAY14_FIXTURE["train_val"] + CHESTXRAY14_FIXTURE["test"]
    expected = CHESTXRAY14_FIXTURE[split] if split else names
    assert [it.meta["image_name"] for it in items] == expected
    for it in items:
        assert set(it.labels) == set(CHESTXRAY14_CLASSES)
        positives = {c for c, v in it.labels.items() if v == 1}
        assert positives == CHESTXRAY14_FIXTURE["positives"][it.meta["image_name"]]
        assert os.path.isfile(it.image) and it.dataset == "chestxray14"
    if split == "train_val":  # images_001/images/ and images_002/images/ (Kaggle layout)
        assert Path(items[0].image).parts[-3:-1] == ("images_001", "images")
        assert items[0].id == "00000001_000"
        assert all(v == 0 for v in items[2].labels.values())  # "No Finding"


def test_chestxray14_bad_rows(cxr14, tmp_path):
    root = Path(shutil.copytree(cxr14, tmp_path / "c"))
    table = root / "Data_Entry_2017.csv"
    table.write_text(table.read_text().replace("Effusion,", "Efusion,", 1))
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv row 4 \(image 00000004_000.png\): "
                                        r"'Finding Labels' 'Efusion'"):  # fmt: skip
        chestxray14(root, split="test")
    (root / "images" / "00000005_000.png").unlink()
    items = chestxray14(root, split="test", skip_bad_rows=True)
    assert [it.id for it in items] == ["00000003_000"]
    assert dict(items.skipped) == {"bad value": 1, "missing image": 1}
    with pytest.raises(DataError, match="unknown split 'train'"):
        chestxray14(root, split="train")


@pytest.mark.parametrize("policy,edema", [("ones", 1), ("zeros", 0), ("ignore", None)])
def test_chexpert_uncertain_policy(chexpert_dir, policy, edema):
    # The parent folder works too: CSV paths start with CheXpert-v1.0-small/.
    for root in (chexpert_dir, chexpert_dir.parent):
        items = chexpert(root, split="valid", uncertain=policy)
        assert [it.id for it in items] == [
            "valid/patient64541/study1/view1_frontal",
            "valid/patient64542/study1/view1_frontal",
            "valid/patient64542/study1/view2_lateral",
        ]
        first = items[0].labels
        assert first["Cardiomegaly"] == 1 and first["Pleural Effusion"] == 0
        assert first["Lung Opacity"] == 0  # blank = 0
        assert first.get("Edema") == edema
        assert set(first) == set(CHEXPERT_CLASSES) - ({"Edema"} if policy == "ignore" else set())
        assert items[1].labels["No Finding"] == 1 and sum(items[1].labels.values()) == 1
        assert items[2].labels["Consolidation"] == 1
        assert os.path.isfile(items[0].image) and items[0].meta["uncertain_policy"] == policy
    front = chexpert(chexpert_dir, split="valid", frontal_only=True)
    assert len(front) == 2
    five = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
    assert set(chexpert(chexpert_dir, split="train", classes=five)[0].labels) == set(five)


def test_chexpert_bad_rows(chexpert_dir, tmp_path):
    root = Path(shutil.copytree(chexpert_dir, tmp_path / "CheXpert-v1.0-small"))
    table = root / "valid.csv"
    table.write_text(table.read_text().replace(",1.0,", ",yes,", 1))
    with pytest.raises(DataError, match=r"valid.csv row 0 \(Path CheXpert-v1.0-small/valid/"
                                        r"patient64541.*is 'yes', expected 1.0, 0.0, -1.0"):  # fmt: skip
        chexpert(root)
    with pytest.raises(DataError, match="unknown uncertain policy 'maybe'"):
        chexpert(root, uncertain="maybe")
    (root / "valid/patient64542/study1/view1_frontal.jpg").unlink()
    items = chexpert(root, skip_bad_rows=True)
    assert len(items) == 1 and dict(items.skipped) == {"bad value": 1, "missing image": 1}


def test_rsna(tmp_path):
    root = make_rsna_fixture(tmp_path)
    items = rsna_pneumonia(root)
    assert {it.id: it.labels["Pneumonia"] for it in items} == RSNA_FIXTURE
    assert [it.id for it in items] == list(RSNA_FIXTURE)
    assert items[1].meta["boxes"] == [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]]
    assert load_image(items[0].image).mode == "RGB"  # a real DICOM
    (root / "stage_2_train_images" / f"{items[2].id}.dcm").unlink()
    with pytest.raises(MissingImageError, match=f"row 3 \\(patientId {items[2].id}\\)"):
        rsna_pneumonia(root)
    table = root / "stage_2_train_labels.csv"
    table.write_text(table.read_text().replace(",0\n", ",2\n", 1))
    with pytest.raises(DataError, match=r"row 0 \(patientId 0004cfab.*Target is '2', expected 0"):
        rsna_pneumonia(root)


def test_siim(tmp_path):
    root = make_siim_fixture(tmp_path)
    items = siim_acr(root)
    assert {it.id: it.labels["Pneumothorax"] for it in items} == SIIM_FIXTURE
    assert [it.meta["n_masks"] for it in items] == [0, 2, 0]
    assert all(Path(it.image).name == f"{it.id}.dcm" for it in items)
    assert load_image(items[1].image).size[0] > 0
    next((root / "dicom-images-train").rglob(f"{items[0].id}.dcm")).unlink()
    with pytest.raises(MissingImageError, match=r"train-rle.csv row 0 \(ImageId 1.2.276"):
        siim_acr(root)
    items = siim_acr(root, skip_bad_rows=True)
    assert len(items) == 2 and items.num_skipped == 1
