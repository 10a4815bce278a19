"""COVIDx and PadChest readers on tiny files in the downloaded layouts, and their MAVL class maps."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from PIL import Image

from medtune.data.covidx_padchest import (
    PADCHEST_RARE,
    PADCHEST_SEEN,
    PADCHEST_UNSEEN,
    covidx,
    padchest,
)
from medtune.data.errors import DataError
from medtune.eval.mavl_zero_shot import entity_indices
from medtune.models.mavl.books import ENTITIES
from medtune.utils.errors import ConfigError


def _png(path, bits16=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.arange(16, dtype=np.uint16 if bits16 else np.uint8).reshape(4, 4) * (
        4000 if bits16 else 9
    )
    Image.fromarray(arr).save(path)


def test_covidx_reads_split_lines_and_refuses_bad_ones(tmp_path):
    for name in ("a.png", "b c.jpg", "d.png"):
        _png(tmp_path / "test" / name)
    f = tmp_path / "test.txt"
    f.write_text(
        "p1 a.png positive stonybrook\n\nA2 b c.jpg negative rsna\np3 d.png Negative cohen\n"
    )
    items = covidx(f, tmp_path / "test")
    assert [(it.id, it.labels, it.meta["source"]) for it in items] == [
        ("a", {"COVID-19": 1}, "stonybrook"),
        ("b c", {"COVID-19": 0}, "rsna"),
        ("d", {"COVID-19": 0}, "cohen"),
    ]
    assert items[0].dataset == "covidx" and items[0].image == str(tmp_path / "test" / "a.png")
    f.write_text("p1 a.png positive stonybrook\np2 d.png COVID-19 sirm\n")
    with pytest.raises(
        DataError, match=r"test.txt.*row 2.*'COVID-19', expected positive or negative"
    ):
        covidx(f, tmp_path / "test")
    f.write_text("p1 missing.png positive x\n")
    with pytest.raises(DataError, match=r"row 1.*image not found: .*missing.png"):
        covidx(f, tmp_path / "test")
    assert len(covidx(f, tmp_path / "test", skip_bad_rows=True)) == 0


def _padchest_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "ImageDir", "StudyDate_DICOM", "Projection", "Labels"])
        for r in rows:
            w.writerow([r[0], r[1], "20150101", r[2], r[3]])


def test_padchest_seen_classes_from_the_label_lists(tmp_path, caplog):
    _png(tmp_path / "0" / "n.png", bits16=True)
    _png(tmp_path / "0" / "e.png")
    _png(tmp_path / "f.png")  # a flat copy of the images
    _png(tmp_path / "1" / "l.png")
    table = tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    _padchest_csv(table, [
        ("n.png", 0, "PA", "['normal']"),
        ("e.png", 0, "AP", "['pleural effusion', ' pulmonary edema', 'pacemaker']"),
        ("x.png", 0, "PA", ""),  # no Labels: left out and counted
        ("f.png", 5, "AP_horizontal", "['cardiomegaly', 'COPD signs', 'rib fracture']"),
        ("l.png", 1, "L", "['mass']"),  # lateral: filtered by projection
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        items = padchest(table, tmp_path, projections=["PA", "AP", "AP_horizontal"])
    assert "1 rows" in caplog.text and "no Labels" in caplog.text
    assert [it.id for it in items] == ["n", "e", "f"]
    assert list(items[0].labels) == list(PADCHEST_SEEN)
    pos = [sorted(c for c, v in it.labels.items() if v) for it in items]
    # edema is read from "pulmonary edema"; "rib fracture" is not "fracture"
    assert pos == [["normal"], ["edema", "pacemaker", "pleural effusion"], ["cardiomegaly"]]
    assert items[1].meta["projection"] == "AP" and items[2].image.endswith("f.png")
    assert len(padchest(table, tmp_path)) == 4  # every projection
    unseen = padchest(table, tmp_path, classes="unseen", projections=["AP_horizontal"])
    assert unseen[0].labels["COPD signs"] == 1 and sum(unseen[0].labels.values()) == 1
    assert len(PADCHEST_UNSEEN) == len(set(PADCHEST_UNSEEN)) == 21 + len(PADCHEST_RARE) == 60
    ids = tmp_path / "ids.txt"
    ids.write_text("e.png\n")
    assert [it.id for it in padchest(table, tmp_path, image_ids=ids)] == ["e"]


def test_padchest_bad_rows_are_one_line(tmp_path):
    _png(tmp_path / "0" / "n.png")
    table = tmp_path / "labels.csv"
    _padchest_csv(table, [("n.png", 0, "PA", "normal, effusion")])
    with pytest.raises(
        DataError, match=r"labels.csv.*row 0.*ImageID n.png.*expected a list of label strings"
    ):
        padchest(table, tmp_path)
    _padchest_csv(table, [("gone.png", 0, "PA", "['normal']")])
    with pytest.raises(DataError, match=r"image not found: .*0/gone.png"):
        padchest(table, tmp_path)
    with pytest.raises(DataError, match="classes 'all'"):
        padchest(table, tmp_path, classes="all")


def test_mavl_entity_maps_for_covidx_and_padchest():
    """MAVL test.py: covid19 is appended to the 75 entities; PadChest's "pleural effusion" is the
    effusion entity, the other seen classes are entities by name; unseen classes are added ones."""

    class _Model:
        entities = [*ENTITIES, "covid19", "COPD signs"]

    class _Item:
        def __init__(self, dataset):
            self.dataset = dataset

    assert entity_indices(_Model, [_Item("covidx")], ["COVID-19"], None) == [75]
    idx = entity_indices(_Model, [_Item("padchest")], list(PADCHEST_SEEN), None)
    assert [_Model.entities[i] for i in idx] == [
        "effusion" if c == "pleural effusion" else c for c in PADCHEST_SEEN
    ]
    assert entity_indices(_Model, [_Item("padchest")], ["COPD signs"], None) == [76]
    with pytest.raises(ConfigError, match="'sternotomy'.*not an entity of the model"):
        entity_indices(_Model, [_Item("padchest")], ["sternotomy"], None)
