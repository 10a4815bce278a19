"""Every generated data set passes tools/check_split_leakage.py, except the leaks the quirk fixtures
copy from the real releases on purpose (and those exactly)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pydicom
import pytest

from medtune.testing.datasets import make_slake_fixture, make_vqa_rad_fixture
from medtune.testing.synthetic import write_synthetic_slake

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("leakage", REPO / "tools" / "check_split_leakage.py")
leakage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(leakage)

# The demo's set (make_tiny_assets' defaults) and the tests' (tests/conftest.py TINY_SIZES).
SIZES = [
    {"n_train": 384, "n_val": 96, "n_test": 96, "seed": 0},
    {"n_train": 288, "n_val": 32, "n_test": 96, "seed": 0},
]


@pytest.mark.parametrize("sizes", SIZES, ids=["demo", "tests"])
def test_synthetic_slake_has_no_leak(tmp_path, sizes):
    root = write_synthetic_slake(tmp_path / "Slake1.0", **sizes)
    report = leakage.find_leaks("slake", str(root))
    assert report["leaks"] == 0, leakage.format_report(report)
    assert leakage.main(["--dataset", "slake", "--input", str(root), "--fail-on-leak"]) == 0
    # the DICOM images are still real DICOM files, one distinct pair per split
    dicoms = sorted((root / "imgs").glob("*/source.dcm"))
    assert len(dicoms) == 6
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in dicoms}
    assert len(uids) == 6
    assert {pydicom.dcmread(p).Modality for p in dicoms} == {"CT", "MR"}


def test_quirk_fixtures_leak_only_as_the_releases_do(tmp_path):
    # SLAKE: a Chinese train question about an English test image, and a pixel copy (docstring of
    # medtune.testing.datasets); VQA-RAD: one test image that train also uses.
    slake = leakage.find_leaks("slake", str(make_slake_fixture(tmp_path)))
    found = {
        tuple(p["splits"]): ([x["image"] for x in p["by_name"]], p["by_pixels"])
        for p in slake["pairs"]
    }
    assert found == {
        ("train", "validation"): ([], []),
        ("train", "test"): (
            ["xmlab5/source.jpg"],
            [{"train": "xmlab1/source.jpg", "test": "xmlab7/source.jpg"}],
        ),
        ("validation", "test"): ([], []),
    }
    rad = leakage.find_leaks("vqa_rad", str(make_vqa_rad_fixture(tmp_path)))
    assert rad["leaks"] == 1
    assert [x["image"] for x in rad["pairs"][0]["by_name"]] == ["synpic12210.jpg"]
