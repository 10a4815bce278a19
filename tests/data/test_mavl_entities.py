"""MedKLIP's entity files (MAVL pretraining) and MAVL's RSNA / SIIM-ACR split files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medtune.data.errors import DataError
from medtune.data.mavl_entities import (
    MAVL_PATH_PREFIX,
    MAVLPretrainDataset,
    mavl_entities,
    triplet_extraction,
)
from medtune.data.mavl_splits import mavl_rsna, mavl_siim
from medtune.testing.mavl import build_cached_tiny_mavl


@pytest.fixture(scope="module")
def assets():
    return build_cached_tiny_mavl()


def test_triplet_extraction_as_mavl():
    cl = np.full((51, 75), -1, dtype=np.int8)
    cl[3, 0] = 1  # entity 0 present at anatomy 3
    cl[5, 0] = 0
    cl[7, 1] = 0  # entity 1 negated only
    cl[9, 2] = 1
    cl[10, 2] = 1  # entity 2 present at 9 and 10
    labels, index = triplet_extraction(cl, random.Random(0))
    assert labels[:4].tolist() == [1, 0, 1, -1] and (labels[4:] == -1).all()
    assert index.shape == (75, 8)
    assert index[0, 0] == 3 and 3 not in index[0, 1:] and len(set(index[0].tolist())) == 8
    assert index[2, 0] in (9, 10) and not ({9, 10} & set(index[2, 1:].tolist()))
    assert 3 not in index[0, 1:] and all(len(set(r)) == 8 for r in index.tolist())
    again = triplet_extraction(cl, random.Random(0))
    assert np.array_equal(again[1], index)  # the item's generator fixes the draws
    full = np.ones((51, 75), dtype=np.int8)
    full[:46, 0] = 1
    with pytest.raises(ValueError, match="fewer than 7"):
        triplet_extraction(full, random.Random(0))


def test_reader_replaces_authors_prefix_and_names_bad_rows(assets, tmp_path):
    m = assets / "mimic"
    data = mavl_entities(
        [str(m / "rad_graph_metric_train.json")],
        str(m / "landmark_observation_adj_mtx.npy"),
        str(m),
    )
    assert len(data["items"]) == 32 and data["labels"].shape == (48, 51, 75)
    assert data["items"][0].id.startswith(MAVL_PATH_PREFIX) and data["items"][0].image.startswith(
        str(m)
    )
    ds = MAVLPretrainDataset(
        data, {"image_size": 64}, train=True, augment={"crop_scale": [0.2, 1.0]}, seed=3
    )
    img, labels, index = ds[0]
    assert img.shape == (3, 64, 64) and labels.shape == (75,) and index.shape == (75, 8)
    assert torch.equal(ds[0][0], img)  # seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], img)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({f"{MAVL_PATH_PREFIX}/files/nope.jpg": {"labels_id": 0}}))
    with pytest.raises(DataError, match=r"bad.json.*row 0.*nope.jpg.*not found"):
        mavl_entities([str(bad)], str(m / "landmark_observation_adj_mtx.npy"), str(m))
    kept = mavl_entities([str(bad), str(m / "rad_graph_metric_test.json")], str(m / "landmark_observation_adj_mtx.npy"),
                         str(m), skip_bad_rows=True)  # fmt: skip
    assert len(kept["items"]) == 8
    np.save(tmp_path / "wrong.npy", np.zeros((2, 50, 75)))
    with pytest.raises(DataError, match=r"shape \(2, 50, 75\), expected \[N, 51, 75\]"):
        mavl_entities([str(bad)], str(tmp_path / "wrong.npy"), str(m))


def test_rsna_and_siim_split_files(assets, tmp_path):
    rsna = mavl_rsna(str(assets / "rsna" / "test.csv"), str(assets / "rsna"))
    assert len(rsna) == 12 and rsna[0].split == "test" and rsna[0].dataset == "rsna_pneumonia"
    pos = [it for it in rsna if it.labels["Pneumonia"] == 1]
    assert pos and all(len(it.meta["boxes"]) == 1 and len(it.meta["boxes"][0]) == 4 for it in pos)
    assert all(it.meta["boxes"] == [] for it in rsna if it.labels["Pneumonia"] == 0)
    siim = mavl_siim(str(assets / "siim" / "test.csv"), str(assets / "siim"))
    assert len(siim) == 12 and siim[0].dataset == "siim_acr"
    assert all((it.labels["Pneumothorax"] == 1) == bool(it.meta["rles"]) for it in siim)
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,img_path,boxes,classes\nx1,images/rsna0024.png,1;2;3,1\n")
    with pytest.raises(DataError, match=r"bad.csv.*row 0.*box '1;2;3': expected x;y;w;h"):
        mavl_rsna(str(bad), str(assets / "rsna"))
