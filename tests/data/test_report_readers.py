"""Report readers (OpenI, MIMIC-CXR-JPG, XrayGPT) on fixtures in the real layouts."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from medtune.data import DataError, MissingImageError
from medtune.data.report_readers import mimic_cxr, openi, parse_report_sections, xraygpt
from medtune.testing.reports import (
    MIMIC_FIXTURE_COUNTS,
    MIMIC_REPORTS,
    OPENI_FIXTURE_COUNTS,
    XRAYGPT_FIXTURE_COUNT,
    make_mimic_cxr_fixture,
    make_openi_fixture,
    make_xraygpt_fixture,
    mimic_dicom_id,
)


@pytest.fixture(scope="module")
def openi_dir(tmp_path_factory):
    return make_openi_fixture(tmp_path_factory.mktemp("openi"))


@pytest.fixture(scope="module")
def mimic_dir(tmp_path_factory):
    return make_mimic_cxr_fixture(tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def xraygpt_dir(tmp_path_factory):
    return make_xraygpt_fixture(tmp_path_factory.mktemp("xraygpt"))


@pytest.mark.parametrize("section", ["findings", "impression", "both"])
def test_openi_sections(openi_dir, section):
    samples = openi(openi_dir, section=section)
    expected = OPENI_FIXTURE_COUNTS[section]
    assert [s.id for s in samples] == [str(u) for u in expected["kept"]]
    assert dict(samples.dropped) == expected["dropped"]
    by_id = {s.id: s for s in samples}
    # uid 4: two frontal images (its lateral left out); findings whitespace-normalised.
    s4 = by_id["4"]
    assert [Path(p).name for p in s4.images] == ["4_IM-0004-1001.dcm.png", "4_IM-0004-1002.dcm.png"]
    assert all(os.path.isabs(p) and os.path.exists(p) for p in s4.images)
    target = {
        "findings": "Small left pleural effusion. Mild basilar atelectasis.",
        "impression": "Left pleural effusion.",
        "both": "Small left pleural effusion. Mild basilar atelectasis. Left pleural effusion.",
    }[section]
    assert [m.role for m in s4.messages] == ["user", "assistant"]
    assert s4.messages[1].content == target == s4.meta["answer"]
    assert s4.meta["task"] == "caption" and s4.meta["dataset"] == "openi"
    assert s4.meta["split"] is None and s4.meta["question"] == s4.messages[0].content


def test_openi_refuses_a_split(openi_dir):
    with pytest.raises(DataError, match="no official split"):
        openi(openi_dir, split="train")
    with pytest.raises(DataError, match="unknown report section 'finding'"):
        openi(openi_dir, section="finding")


def test_openi_bad_rows(openi_dir, tmp_path):
    root = Path(shutil.copytree(openi_dir, tmp_path / "openi"))
    (root / "images" / "images_normalized" / "5_IM-0005-1001.dcm.png").unlink()
    with pytest.raises(MissingImageError) as e:
        openi(root)
    msg = str(e.value)
    assert "indiana_projections.csv row 8 (uid 5)" in msg and "5_IM-0005-1001.dcm.png" in msg
    samples = openi(root, skip_bad_rows=True)
    assert [s.id for s in samples] == ["1", "4"] and dict(samples.skipped) == {"missing image": 1}
    # A table without its findings column names the file and the columns it has.
    text = (root / "indiana_reports.csv").read_text().replace("findings", "Findings_", 1)
    (root / "indiana_reports.csv").write_text(text)
    with pytest.raises(DataError, match=r"indiana_reports.csv: missing column\(s\) 'findings'"):
        openi(root)


def test_parse_report_sections(mimic_dir):
    for path in sorted(mimic_dir.glob("files/p*/p*/s*.txt")):
        study = path.stem[1:]
        assert parse_report_sections(path.read_text()) == MIMIC_REPORTS[study], study
    text = "impression:  A.\nFINDINGS: B\n  c.\nRECOMMENDATION(S): none\nIMPRESSION: D."
    assert parse_report_sections(text) == {"findings": "B c.", "impression": "A. D."}
    assert parse_report_sections("No headers at all.") == {"findings": "", "impression": ""}


@pytest.mark.parametrize("split,section", sorted(MIMIC_FIXTURE_COUNTS))
def test_mimic_cxr(mimic_dir, split, section):
    samples = mimic_cxr(mimic_dir, split=split, section=section)
    assert [s.id for s in samples] == MIMIC_FIXTURE_COUNTS[(split, section)]
    for s in samples:
        assert s.meta["split"] == split and s.meta["task"] == "caption"
        assert set(s.meta["view_positions"]) <= {"PA", "AP"}
        assert all(os.path.exists(p) for p in s.images)
        sections = MIMIC_REPORTS[s.id]
        want = {
            "findings": sections["findings"],
            "impression": sections["impression"],
            "both": " ".join(t for t in sections.values() if t),
        }[section]
        assert s.messages[-1].content == want
    if (split, section) == ("train", "findings"):
        assert dict(samples.dropped) == {"empty findings": 1, "no frontal image": 1}
        s2 = samples[1]  # AP then PA in the split file: PA first
        assert s2.meta["view_positions"] == ["PA", "AP"]
        assert s2.meta["dicom_ids"] == [mimic_dicom_id("b2"), mimic_dicom_id("b1")]
        assert s2.meta["image"][0] == f"files/p10/p10000032/s50000002/{mimic_dicom_id('b2')}.jpg"
        one = mimic_cxr(mimic_dir, split=split, section=section, max_images=1)
        assert [len(s.images) for s in one] == [1, 1]


def test_mimic_cxr_bad_rows(mimic_dir, tmp_path):
    with pytest.raises(DataError, match="unknown split 'val'"):
        mimic_cxr(mimic_dir, split="val")
    root = Path(shutil.copytree(mimic_dir, tmp_path / "mimic"))
    (root / "files/p10/p10000032/s50000002.txt").unlink()
    with pytest.raises(DataError) as e:
        mimic_cxr(root)
    assert "mimic-cxr-2.0.0-split.csv.gz row 2 (study_id 50000002): report not found" in str(
        e.value
    )
    samples = mimic_cxr(root, skip_bad_rows=True)
    assert [s.id for s in samples] == ["50000001"]
    assert dict(samples.skipped) == {"missing report": 1}
    (root / f"files/p10/p10000032/s50000001/{mimic_dicom_id('a1')}.jpg").unlink()
    with pytest.raises(MissingImageError, match=f"row 0 \\(dicom_id {mimic_dicom_id('a1')}\\)"):
        mimic_cxr(root, skip_bad_rows=False)
    # A split value outside train/validate/test is a named error.
    rows = list(csv.reader(gzip.decompress((root / "mimic-cxr-2.0.0-split.csv.gz").read_bytes())
                           .decode().splitlines()))  # fmt: skip
    rows[3][3] = "valid"
    text = "\n".join(",".join(r) for r in rows) + "\n"
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match=r"split.csv.gz row 2: split is 'valid'"):
        mimic_cxr(root)
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(DataError, match=r"mimic-cxr-2.0.0-metadata.csv \(nor"):
        mimic_cxr(root)


def test_xraygpt(xraygpt_dir, tmp_path):
    samples = xraygpt(xraygpt_dir)
    assert len(samples) == XRAYGPT_FIXTURE_COUNT
    assert Path(samples[2].images[0]).name == "7.png"
    ann = json.loads((xraygpt_dir / "filter_cap.json").read_text())["annotations"]
    assert [s.id for s in samples] == [a["image_id"] for a in ann]
    assert [s.messages[1].content for s in samples] == [a["caption"] for a in ann]
    assert samples[0].meta["task"] == "caption" and samples[0].meta["dataset"] == "xraygpt"
    root = Path(shutil.copytree(xraygpt_dir, tmp_path / "x"))
    ann[1] = {"image_id": ann[1]["image_id"]}
    (root / "filter_cap.json").write_text(json.dumps({"annotations": ann}))
    with pytest.raises(DataError, match=r"filter_cap.json row 1 \(image_id 427446c1.*'caption'"):
        xraygpt(root)
    assert [s.id for s in xraygpt(root, skip_bad_rows=True)] == [ann[0]["image_id"], "7"]
    (root / "filter_cap.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match='expected {"annotations"'):
        xraygpt(root)


def _convert_tool():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "convert_to_sharegpt.py"
    spec = importlib.util.spec_from_file_location("convert_to_sharegpt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "dataset,extra,reader",
    [
        ("openi", ["--section", "both"], lambda d: openi(d, section="both")),
        ("mimic_cxr", ["--split", "validate"], lambda d: mimic_cxr(d, split="validate")),
        ("xraygpt", [], xraygpt),
    ],
)
def test_convert_to_sharegpt(
    dataset, extra, reader, openi_dir, mimic_dir, xraygpt_dir, tmp_path, capsys
):
    from medtune.data import IMAGE_MARKER, sharegpt

    src = {"openi": openi_dir, "mimic_cxr": mimic_dir, "xraygpt": xraygpt_dir}[dataset]
    out = tmp_path / f"{dataset}.json"
    convert = _convert_tool()
    argv = ["--dataset", dataset, "--input", str(src), "--output", str(out), "--relative", *extra]
    assert convert.main(argv) == 0
    original, back = reader(src), sharegpt(out)
    assert len(back) == len(original) > 0
    assert f"wrote {len(original)} conversations" in capsys.readouterr().out
    for a, b in zip(original, back):
        assert b.id == a.id and b.images == a.images and b.meta == a.meta
        assert (
            b.messages[0].content == (IMAGE_MARKER + "\n") * len(a.images) + a.messages[0].content
        )
        assert b.messages[1].content == a.messages[1].content


def test_convert_split_rules(mimic_dir, openi_dir, tmp_path):
    convert = _convert_tool()
    out = str(tmp_path / "o.json")
    with pytest.raises(SystemExit):  # argparse: --split is required for MIMIC-CXR
        convert.main(["--dataset", "mimic_cxr", "--input", str(mimic_dir), "--output", out])
    with pytest.raises(DataError, match="no official split"):
        convert.main(["--dataset", "openi", "--input", str(openi_dir), "--split", "train",
                      "--output", out])  # fmt: skip
