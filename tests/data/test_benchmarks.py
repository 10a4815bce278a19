"""The benchmark readers (medtune.data.benchmarks) on generated files in each real layout.

Each reader returns the fixture's questions with the documented fields, and a damaged row stops
it with a DataError naming the file, the row and what was expected (or is skipped and counted
with skip_bad_rows=True).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from medtune.data import DataError, load_image
from medtune.data.benchmarks import (
    MMMU_HEALTH_SUBJECTS,
    medxpertqa,
    mmmu,
    omnimedvqa,
    pathvqa,
    pmc_vqa,
    vqa_rad_hf,
)
from medtune.data.errors import BadValueError, MissingFieldError, MissingImageError
from medtune.testing.benchmarks import COUNTS, make_benchmark_fixtures, png_bytes, write_parquet


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_benchmark_fixtures(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def copy(bench, tmp_path):
    def _copy(name: str) -> Path:
        return Path(shutil.copytree(bench / name, tmp_path / name))

    return _copy


def test_parquet_vqa_readers(bench):
    s = pathvqa(bench / "path-vqa")
    assert len(s) == COUNTS["pathvqa"]
    assert [x.meta["answer_type"] for x in s] == [
        "CLOSED",
        "CLOSED",
        "OPEN",
        "OPEN",
        "CLOSED",
        "OPEN",
    ]
    assert s[4].meta["answer"] == "Yes"  # yes/no by lower-cased answer, text kept as is
    assert s[0].meta["image"] == "img_0.png" and s[0].meta["dataset"] == "pathvqa"
    assert load_image(s[0].images[0]).size == (32, 32)
    assert s[0].messages[0].content == "Is there a lesion?" and s[0].messages[1].content == "yes"
    assert len(pathvqa(bench / "path-vqa", answer_types="OPEN")) == 3
    r = vqa_rad_hf(bench / "vqa-rad")
    assert (
        len(r) == COUNTS["vqa_rad"]
        and r[0].id == "vqa_rad-test-0"
        and r[0].meta["dataset"] == "vqa_rad"
    )
    with pytest.raises(DataError, match="no parquet file for split 'validation'"):
        pathvqa(bench / "path-vqa", split="validation")


def test_parquet_bad_rows(tmp_path):
    good = {"image": {"bytes": png_bytes(1), "path": "a.png"}, "question": "q?", "answer": "yes"}
    path = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                         [good, {**good, "answer": None}, {**good, "image": {"bytes": None, "path": None}}])  # fmt: skip
    with pytest.raises(
        MissingFieldError, match=r"test-00000-of-00001.parquet row 1: missing field 'answer'"
    ):
        pathvqa(tmp_path)
    s = pathvqa(tmp_path, skip_bad_rows=True)
    assert len(s) == 1 and s.skipped == {"missing field": 1, "missing image": 1}
    assert path.is_file()


def test_pmc_vqa(bench, copy):
    s = pmc_vqa(bench / "PMC-VQA")
    assert len(s) == COUNTS["pmc_vqa"]
    m = s[1].meta
    assert m["task"] == "mcq" and m["choices"] == [
        "CT",
        "MRI",
        "X-ray",
        "Ultrasound",
    ]  # "A:" dropped
    assert m["answer"] == "B" and s[1].messages[1].content == "B" and m["image"] == "PMC1_F1.jpg"
    assert s[1].id == "pmc_vqa-1" and Path(s[1].images[0]).is_file()
    root = copy("PMC-VQA")
    rows = list(csv.reader((root / "test_2.csv").read_text().splitlines()))
    rows[2][8] = "E"  # answer outside A-D
    with open(root / "test_2.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(
        BadValueError, match=r"test_2.csv row 1 \(id pmc_vqa-1\): field 'Answer' is 'E'"
    ):
        pmc_vqa(root)
    (root / "figures" / "PMC0_F1.jpg").unlink()
    s = pmc_vqa(root, skip_bad_rows=True)
    assert len(s) == 2 and s.skipped == {"bad value": 1, "missing image": 1}
    rows[0] = [c.replace("Choice C", "Option C") for c in rows[0]]
    with open(root / "test_2.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match="csv header lacks 'Choice C'"):
        pmc_vqa(root)


def test_omnimedvqa(bench, copy):
    s = omnimedvqa(bench / "OmniMedVQA")
    assert len(s) == COUNTS["omnimedvqa"]
    m = s[1].meta
    assert m["choices"] == ["Normal", "Nodule"] and m["answer"] == "B"  # gt_answer "Nodule" -> B
    assert m["modality"] == "CT" and m["question_type"] == "Disease Diagnosis"
    assert m["subset"] == "Chest CT Scan" and s[1].id == "omnimedvqa-Chest CT Scan_1"
    assert {x.meta["modality"] for x in s} == {"CT", "MR"}
    assert len(omnimedvqa(bench / "OmniMedVQA", sources=["Knee MRI"])) == 2
    root = copy("OmniMedVQA")
    f = root / "QA_information" / "Open-access" / "Knee MRI.json"
    rows = json.loads(f.read_text())
    rows[1]["gt_answer"] = "Tear"
    f.write_text(json.dumps(rows))
    with pytest.raises(
        BadValueError,
        match=r"Knee MRI.json row 1 \(question_id Knee MRI_1\): gt_answer 'Tear' equals none",
    ):
        omnimedvqa(root)


def test_medxpertqa(bench, copy):
    s = medxpertqa(bench / "MedXpertQA")
    assert len(s) == COUNTS["medxpertqa_mm"]
    assert [len(x.images) for x in s] == [1, 2, 1]  # several images per question
    m = s[1].meta
    assert m["choices"][4] == "Normal" and m["answer"] == "B" and m["dataset"] == "medxpertqa_mm"
    assert m["medical_task"] == "Diagnosis" and m["image"] == ["MM-1-0.jpeg", "MM-1-1.jpeg"]
    root = copy("MedXpertQA")
    lines = (root / "MM" / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["options"] = {"A": "x", "C": "y"}
    lines[2] = json.dumps(row)
    (root / "MM" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        BadValueError, match=r"test.jsonl row 2 \(id MM-2\): options keys \['A', 'C'\]"
    ):
        medxpertqa(root)
    (root / "images" / "MM-1-1.jpeg").unlink()
    s = medxpertqa(root, skip_bad_rows=True)
    assert len(s) == 1 and s.skipped == {"bad value": 1, "missing image": 1}


def test_mmmu(bench, tmp_path):
    s = mmmu(bench / "MMMU")
    assert len(s) == COUNTS["mmmu_med"]
    assert [x.meta["subset"] for x in s] == list(MMMU_HEALTH_SUBJECTS)
    assert len(s[0].images) == 2 and s[0].meta["choices"] == ["aspirin", "insulin", "heparin"]
    assert s[1].meta["answer"] == "B" and s[1].meta["task"] == "mcq"
    good = {"id": "v_1", "question": "<image 1> ?", "options": "['a', 'b']", "answer": "A",
            "question_type": "multiple-choice", "image_1": {"bytes": png_bytes(3), "path": "x.png"}}  # fmt: skip
    write_parquet(tmp_path / "Pharmacy" / "validation-0.parquet",
                  [good, {**good, "id": "v_2", "options": "not a list"},
                   {**good, "id": "v_3", "question_type": "open", "answer": "5 mg"}])  # fmt: skip
    with pytest.raises(
        BadValueError, match=r"validation-0.parquet row 1 \(id v_2\): field 'options'"
    ):
        mmmu(tmp_path, subjects="Pharmacy")
    s = mmmu(
        tmp_path,
        subjects="Pharmacy",
        question_types=["multiple-choice", "open"],
        skip_bad_rows=True,
    )
    assert [x.id for x in s] == ["v_1", "v_3"] and s[1].meta["answer_type"] == "OPEN"
    with pytest.raises(DataError, match="Basic_Medical_Science: no parquet file"):
        mmmu(tmp_path)


def test_missing_images_named(bench, copy):
    root = copy("OmniMedVQA")
    shutil.rmtree(root / "Images" / "Knee MRI")
    with pytest.raises(MissingImageError, match=r"Knee MRI.json row 0 .*image not found"):
        omnimedvqa(root)


def test_slake_hub_copy_is_the_slake1_layout(slake_dir, tmp_path):
    """BoKelvin/SLAKE unpacks to {train,validation,test}.json + imgs/ at its top: the slake reader
    reads it as it reads Slake1.0."""
    from medtune.data import slake

    hub = Path(shutil.copytree(slake_dir, tmp_path / "SLAKE"))
    assert [s.id for s in slake(hub, "test")] == [s.id for s in slake(slake_dir, "test")]
