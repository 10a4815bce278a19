"""OpenI held out by uid: seeded, fraction, written once and reused, leakage checked."""

from __future__ import annotations

import json

import pytest

from medtune.data.errors import DataError
from medtune.data.uid_split import make_uid_split, uid_of, xraygpt_openi
from medtune.testing.reports import save_xray


def _openi(root, uids=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), views=("1001", "2001")):
    base = root / "openi"
    anns = []
    for u in uids:
        for v in views:  # a frontal and a lateral image per report, as OpenI
            iid = f"CXR{u}_IM-{u:04d}-{v}"
            save_xray(base / "image" / f"{iid}.png", seed=u * 10 + int(v[0]))
            anns.append({"image_id": iid, "caption": f"Report {u}: the lungs are clear."})
    (base / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    return base


def test_split_by_uid_written_once_and_reused(tmp_path):
    root = _openi(tmp_path)
    split_file = tmp_path / "split.json"
    train = xraygpt_openi(root, "train", split_file, fraction=0.2, seed=3)
    val = xraygpt_openi(root, "validation", split_file, fraction=0.2, seed=3)
    tu, vu = {s.meta["uid"] for s in train}, {s.meta["uid"] for s in val}
    assert len(vu) == 2 and len(tu) == 8 and not tu & vu
    assert len(train) + len(val) == 20 and len(val) == 4  # both images of a study go together
    assert all(s.meta["split"] == "validation" for s in val)
    written = json.loads(split_file.read_text())
    assert sorted(written["validation"]) == sorted(vu)
    # seeded: the same uids for the same seed, others for another seed
    assert make_uid_split([str(u) for u in range(1, 11)], 0.2, 3)["validation"] == sorted(vu)
    assert make_uid_split([str(u) for u in range(1, 11)], 0.2, 4)["validation"] != sorted(vu)
    # reused: new reports do not move a study; they are refused unless allow_new
    _openi(tmp_path, uids=range(1, 12))  # report 11 arrives later
    with pytest.raises(DataError, match=r"uid\(s\) \['11'\] are not in the split file"):
        xraygpt_openi(root, "train", split_file, fraction=0.2, seed=3)
    again = xraygpt_openi(root, "validation", split_file, fraction=0.2, seed=3, allow_new=True)
    assert {s.meta["uid"] for s in again} == vu
    with pytest.raises(DataError, match="written with seed 3"):
        xraygpt_openi(root, "train", split_file, fraction=0.3, seed=3, allow_new=True)


def test_leakage_check_runs_on_read(tmp_path):
    root = _openi(tmp_path, uids=(1, 2, 3))
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"seed": 0, "fraction": 0.5, "train": ["1", "2"],
                                      "validation": ["2", "3"]}))  # fmt: skip
    with pytest.raises(DataError, match=r"uid split leaks: uid\(s\) \['2'\]"):
        xraygpt_openi(root, "train", split_file, fraction=0.5, seed=0)


def test_uid_of_names():
    from medtune.data.sample import Sample

    assert uid_of(Sample("CXR12_IM-0001-1001", [], [], {})) == "12"
    assert uid_of(Sample("x", [], [], {"uid": 7})) == "7"
    with pytest.raises(DataError, match="no OpenI uid"):
        uid_of(Sample("abea5eb9-b7c3", [], [], {}))
