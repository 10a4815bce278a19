"""ROCO as released (razorx89/roco-dataset + scripts/fetch.py images): captions.txt + dlinks.txt."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from medtune.data import DataError, MissingImageError, roco
from medtune.data.errors import MalformedJSONError

# the release's own line formats: a space after the caption's tab; dlinks hold the wget command
CAPTIONS = (
    "ROCO_00020\t Axial computed tomography scan of the pelvis showing a diffuse infiltration of the bladder wall.\n"
    "ROCO_00027\t Postoperative anteroposterior radiograph of the pelvis.\n"
    "ROCO_00059\t Angiography of the internal carotid artery, late arterial phase.\n"
)
DLINKS = (
    "ROCO_00020\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/cb/dd/PMC4327453.tar.gz -P /path/to/Dir\t"
    "1678-7757-jaos-14-02-0117-gf05.jpg\n"
    "ROCO_00027\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/b5/0c/PMC4085828.tar.gz -P /path/to/Dir\t"
    "opth-9-169Fig1.jpg\n"
    "ROCO_00059\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/62/b5/PMC3286503.tar.gz -P /path/to/Dir\t"
    "pone.0031179.g007.jpg\n"
)


def _release(tmp_path: Path, fetched=(0, 1, 2), captions=CAPTIONS, dlinks=DLINKS) -> Path:
    root = tmp_path / "roco-dataset"
    folder = root / "data" / "validation" / "radiology"
    (folder / "images").mkdir(parents=True)
    (folder / "captions.txt").write_text(captions)
    (folder / "dlinks.txt").write_text(dlinks)
    for i, line in enumerate(dlinks.splitlines()):
        if i in fetched:
            cols = line.split("\t")
            pmc = cols[1].split()[2].rsplit("/", 1)[-1][:-7]
            Image.new("L", (16, 16), 40 * i).save(folder / "images" / f"{pmc}_{cols[2]}")
    return root


def test_roco_reads_the_release_layout(tmp_path):
    root = _release(tmp_path)
    s = roco(root, split="validation")
    assert [x.id for x in s] == ["ROCO_00020", "ROCO_00027", "ROCO_00059"]
    assert (
        s[1].meta["caption"] == "Postoperative anteroposterior radiograph of the pelvis."
    )  # stripped
    assert s[1].messages[1].content == s[1].meta["answer"] == s[1].meta["caption"]
    assert s[1].images == [
        str(root / "data/validation/radiology/images/PMC4085828_opth-9-169Fig1.jpg")
    ]
    assert s[1].meta["pmc_id"] == "PMC4085828" and s[1].meta["task"] == "caption"
    assert s[1].meta["dataset"] == "roco" and s[1].meta["split"] == "validation"
    # root may also be the data/ folder
    assert [x.id for x in roco(root / "data", split="validation")] == [x.id for x in s]


def test_roco_missing_image_is_named_or_skipped_and_counted(tmp_path):
    root = _release(tmp_path, fetched=(0, 2))
    with pytest.raises(
        MissingImageError, match=r"dlinks\.txt row 1.*ROCO_00027.*PMC4085828_opth-9-169Fig1\.jpg"
    ):
        roco(root, split="validation")
    s = roco(root, split="validation", skip_bad_rows=True)
    assert [x.id for x in s] == ["ROCO_00020", "ROCO_00059"] and s.num_skipped == 1


def test_roco_bad_layouts_are_clear(tmp_path):
    with pytest.raises(DataError, match=r"no folder .*test/radiology"):
        roco(_release(tmp_path), split="test")
    with pytest.raises(DataError, match="unknown subset 'ct'"):
        roco(tmp_path, subset="ct")
    bad = _release(tmp_path / "b", captions=CAPTIONS + "ROCO_00060 no tab here\n")
    with pytest.raises(
        MalformedJSONError, match=r"captions\.txt row 3: expected 2 tab-separated columns"
    ):
        roco(bad, split="validation")
    nolink = _release(
        tmp_path / "c", captions=CAPTIONS + "ROCO_00061\t A caption without a link.\n"
    )
    with pytest.raises(MissingImageError, match=r"ROCO_00061.*no download link"):
        roco(nolink, split="validation")


def test_roco_converts_to_sharegpt(tmp_path):
    import json
    import subprocess
    import sys

    root = _release(tmp_path)
    out = tmp_path / "roco_val.json"
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_to_sharegpt.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(tool),
            "--dataset",
            "roco",
            "--input",
            str(root),
            "--split",
            "validation",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["ROCO_00020", "ROCO_00027", "ROCO_00059"]
    assert (
        rows[1]["conversations"][1]["value"]
        == "Postoperative anteroposterior radiograph of the pelvis."
    )
    assert Path(rows[1]["image"]).is_file()


def test_roco_config_runs_through_the_cli_on_tiny_models(tiny_assets, tmp_path, medtune_cli):
    """``vision_finetune/roco`` as shipped, its data_dir a ROCO release folder and its model swapped
    for the tiny one: caption pre-training runs and saves the trained parts."""
    import sys

    root = _release(tmp_path)
    train = root / "data" / "train"
    train.mkdir()
    (root / "data" / "validation" / "radiology").rename(train / "radiology")
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "medtune"), "run", "vision_finetune", "--config", "roco",
        f"data_dir={root}", f"model_dir={tiny_assets / 'llama3_tiny'}", f"output_dir={out}",
        "model._component_=medtune.models.builders.tiny_medvlm", "~model.encoder_path",
        f"+model.assets_dir={tiny_assets}", "checkpointer.checkpoint_files=[model.safetensors]",
        "llm_dtype=fp32", "autocast=false", "device=cpu", "epochs=1", "batch_size=3", "num_workers=0",
        "val_dataset=null", "gradient_accumulation_steps=1",
    ]  # fmt: skip
    proc = medtune_cli.run_command(cmd, cwd=tmp_path, timeout=300)  # forked, pre-imported
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "3 training samples" in proc.stdout
    assert (out / "epoch_0" / "model.safetensors").is_file()
