"""tools/convert_to_sharegpt.py (round trip through sharegpt()) and tools/check_split_leakage.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from medtune.data import IMAGE_MARKER, caption_json, sharegpt, slake, vqa_rad

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert = _tool("convert_to_sharegpt")
leakage = _tool("check_split_leakage")


def _same(original, back):
    """Same samples; the only difference allowed is the explicit leading <image> marker."""
    assert [s.id for s in back] == [s.id for s in original]
    for a, b in zip(original, back):
        assert b.images == a.images
        assert b.meta == a.meta
        assert [m.role for m in b.messages] == [m.role for m in a.messages]
        first = b.messages[0].content
        assert first == (IMAGE_MARKER + "\n") * len(a.images) + a.messages[0].content
        assert [m.content for m in b.messages[1:]] == [m.content for m in a.messages[1:]]


@pytest.mark.parametrize("relative", [False, True])
def test_convert_slake_round_trip(slake_dir, tmp_path, relative):
    out = tmp_path / "out" / "slake_test.json"
    argv = [
        "--dataset",
        "slake",
        "--input",
        str(slake_dir),
        "--split",
        "test",
        "--output",
        str(out),
        "--lang",
        "all",
    ] + (["--relative"] if relative else [])
    assert convert.main(argv) == 0
    rows = json.loads(out.read_text("utf-8"))
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
    assert os.path.isabs(rows[0]["image"]) != relative
    _same(slake(slake_dir, "test", lang=None), sharegpt(out))


def test_convert_relative_moves_with_images(slake_dir, tmp_path):
    src = tmp_path / "src"
    data = shutil.copytree(slake_dir, src / "Slake1.0")
    out = src / "out" / "train.json"
    convert.main(
        [
            "--dataset",
            "slake",
            "--input",
            str(data),
            "--split",
            "train",
            "--output",
            str(out),
            "--relative",
        ]
    )
    dst = Path(shutil.move(src, tmp_path / "dst"))  # the folder moves as a whole
    back = sharegpt(dst / "out" / "train.json")
    assert back[0].images == [str(dst / "Slake1.0" / "imgs" / "xmlab0" / "source.jpg")]
    assert len(back) == len(slake(dst / "Slake1.0", "train"))


def test_convert_vqa_rad_and_caption_round_trip(vqa_rad_dir, tmp_path):
    out = tmp_path / "rad.json"
    assert (
        convert.main(
            [
                "--dataset",
                "vqa_rad",
                "--input",
                str(vqa_rad_dir),
                "--split",
                "train",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    _same(vqa_rad(vqa_rad_dir, "train"), sharegpt(out))

    figs = tmp_path / "figs"
    figs.mkdir()
    for n in ("f1.png", "f2.png"):
        Image.new("RGB", (4, 4)).save(figs / n)
    cap = figs / "captions.json"
    cap.write_text(
        json.dumps(
            [
                {"image": "f1.png", "caption": "CT of the head."},
                {"image": ["f1.png", "f2.png"], "caption": "Two panels.", "id": "p2"},
            ]
        )
    )
    out2 = tmp_path / "cap.json"
    assert convert.main(["--dataset", "caption", "--input", str(cap), "--output", str(out2)]) == 0
    _same(caption_json(cap), sharegpt(out2))


def test_convert_requires_split(slake_dir, tmp_path):
    with pytest.raises(SystemExit):
        convert.main(
            ["--dataset", "slake", "--input", str(slake_dir), "--output", str(tmp_path / "x.json")]
        )


def test_leakage_slake(slake_dir, capsys, tmp_path):
    assert leakage.main(["--dataset", "slake", "--input", str(slake_dir)]) == 0
    report = json.loads(json.dumps(leakage.find_leaks("slake", str(slake_dir))))
    pair = next(p for p in report["pairs"] if p["splits"] == ["train", "test"])
    assert [x["image"] for x in pair["by_name"]] == ["xmlab5/source.jpg"]
    assert pair["by_name"][0]["train"] == {"zh": 2} and pair["by_name"][0]["test"]["en"] == 4
    assert pair["by_pixels"] == [{"train": "xmlab1/source.jpg", "test": "xmlab7/source.jpg"}]
    assert report["leaks"] == 2
    out = capsys.readouterr().out
    assert "train vs test: 1 shared by file name, 1 identical pixels" in out and "LEAK: 2" in out
    js = tmp_path / "r.json"
    assert (
        leakage.main(
            ["--dataset", "slake", "--input", str(slake_dir), "--fail-on-leak", "--json", str(js)]
        )
        == 1
    )
    assert json.loads(js.read_text())["leaks"] == 2


def test_leakage_vqa_rad(vqa_rad_dir, capsys):
    assert (
        leakage.main(["--dataset", "vqa_rad", "--input", str(vqa_rad_dir), "--fail-on-leak"]) == 1
    )
    assert "name   synpic12210.jpg" in capsys.readouterr().out


def test_no_leak_exit_zero(slake_copy):
    # Drop every test row that leaks: then --fail-on-leak passes.
    f = slake_copy / "train.json"
    rows = [r for r in json.loads(f.read_text("utf-8")) if r["img_id"] not in (1, 5)]
    f.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    assert leakage.main(["--dataset", "slake", "--input", str(slake_copy), "--fail-on-leak"]) == 0


def test_convert_bad_row_is_one_error_line_and_no_output(slake_copy, tmp_path):
    # Through the script itself (its run_entry wiring): one line naming file, row and field.
    import subprocess
    import sys

    f = slake_copy / "train.json"
    rows = json.loads(f.read_text("utf-8"))
    del rows[1]["question"]
    f.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    out = tmp_path / "out" / "train.json"
    out.parent.mkdir()
    out.write_text("previous")
    argv = ["--dataset", "slake", "--input", str(slake_copy), "--split", "train"]
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "convert_to_sharegpt.py"), *argv, "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"convert_to_sharegpt: error: {f} row 1 (qid {rows[1]['qid']}): missing field 'question' "
        "(expected a string)"
    ]
    assert out.read_text() == "previous" and os.listdir(out.parent) == ["train.json"]
