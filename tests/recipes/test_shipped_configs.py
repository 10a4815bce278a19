"""Every shipped config of ``qformer_pretrain``, ``contrastive_pretrain`` and ``zero_shot_classify``
passes ``medtune validate`` and runs through ``medtune run`` (in this process) on tiny models, with
tiny generated data in the layout the config documents (ROCO release folder, caption JSON,
ChestX-ray14 / CheXpert / RSNA / SIIM downloads). Only paths, sizes and the model are overridden:
the full-size towers are swapped for the tiny ones (as the demo configs do), 1 step, tiny batches.
The zero-shot cases load one contrastive checkpoint trained once for this module (1 step): the
prompt configs from its open_clip export (``model.path``), the others by ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from medtune._cli.main import main as medtune_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# ROCO as released: captions.txt / dlinks.txt per split and subset, images fetched by fetch.py
_ROCO = [
    ("ROCO_00020", "PMC4327453", "1678-7757-jaos-14-02-0117-gf05.jpg",
     "Axial computed tomography scan of the pelvis."),
    ("ROCO_00027", "PMC4085828", "opth-9-169Fig1.jpg",
     "Postoperative anteroposterior radiograph of the pelvis."),
    ("ROCO_00059", "PMC3286503", "pone.0031179.g007.jpg",
     "Angiography of the internal carotid artery, late arterial phase."),
]  # fmt: skip

# SAM's timm encoder at test size (the shape of medtune.models.encoders.tiny_sam_vision)
_TINY_SAM = dict(depth=2, embed_dim=32, num_heads=2, global_attn_indexes=[1], window_size=2,
                 neck_chans=24)  # fmt: skip


def _medtune(*args: str) -> tuple[int, str, str]:
    """``medtune <args>`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = medtune_main(list(args))
        except SystemExit as e:  # ``medtune run`` executes the recipe here; its sys.exit propagates
            status = e.code
    return int(status or 0), out.getvalue(), err.getvalue()


def _ok(*args: str) -> str:
    status, stdout, stderr = _medtune(*args)
    assert status == 0, (
        f"medtune {' '.join(args)}: exit {status}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    )
    return stdout + stderr


def _roco_release(root: Path) -> Path:
    """A ROCO clone with train and validation radiology folders (3 fetched images each)."""
    for split in ("train", "validation"):
        folder = root / "data" / split / "radiology"
        (folder / "images").mkdir(parents=True)
        caps, links = [], []
        for i, (rid, pmc, name, cap) in enumerate(_ROCO):
            caps.append(f"{rid}\t {cap}\n")
            links.append(f"{rid}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/aa/bb/"
                         f"{pmc}.tar.gz -P /path/to/Dir\t{name}\n")  # fmt: skip
            Image.new("L", (16, 16), 40 * i + 20).save(folder / "images" / f"{pmc}_{name}")
        (folder / "captions.txt").write_text("".join(caps))
        (folder / "dlinks.txt").write_text("".join(links))
    return root


def _concept_book(path: Path, classes: list[str]) -> Path:
    path.write_text(
        json.dumps({c: [f"{c.lower()} seen.", f"signs of {c.lower()}."] for c in classes})
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Tiny downloads in their real layouts: ROCO, ChestX-ray14, CheXpert, RSNA, SIIM, and a tiny
    SAM checkpoint (safetensors, timm names)."""
    from safetensors.torch import save_file

    from medtune.testing.classification import (
        make_chestxray14_fixture,
        make_chexpert_fixture,
        make_rsna_fixture,
        make_siim_fixture,
    )

    root = tmp_path_factory.mktemp("shipped")
    import timm

    torch.manual_seed(0)
    sam = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0, img_size=64,
                            **_TINY_SAM)  # fmt: skip
    save_file(
        {k: v.contiguous() for k, v in sam.state_dict().items()}, str(root / "sam.safetensors")
    )
    return {
        "roco": _roco_release(root / "roco-dataset"),
        "chestxray14": make_chestxray14_fixture(root),
        "chexpert": root,  # the reader accepts the release folder's parent, as downloaded
        "chexpert_release": make_chexpert_fixture(root),
        "rsna": make_rsna_fixture(root),
        "siim": make_siim_fixture(root),
        "sam": root / "sam.safetensors",
        "root": root,
    }


@pytest.fixture(scope="module")
def contrastive_ckpt(tiny_towers, tmp_path_factory) -> Path:
    """``contrastive_pretrain --config demo`` for 1 step: the checkpoint the zero-shot cases load."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _ok("run", "contrastive_pretrain", "--config", "demo", f"assets_dir={tiny_towers}",
        f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1", "batch_size=4")  # fmt: skip
    assert (out / "epoch_0" / "open_clip" / "open_clip_config.json").is_file()
    return out / "epoch_0"


# ------------------------------------------------------------------------- pretraining configs

_QFORMER_TINY = ["model.num_query_tokens=4", "model.embed_dim=8", "max_txt_len=16", "epochs=1",
                 "max_steps_per_epoch=1", "batch_size=3", "autocast=false", "device=cpu",
                 "num_workers=0", "gradient_accumulation_steps=1", "log_every_n_steps=1"]  # fmt: skip


def _qformer_overrides(config: str, towers: Path, data: dict) -> list[str]:
    common = [f"bert_dir={towers / 'tiny_bert'}", f"data_dir={data['roco']}", *_QFORMER_TINY]
    if config == "roco_biomedclip":
        return [f"encoder_dir={towers / 'tiny_biomedclip'}", *common]
    # roco_sam: the same timm SAM encoder and checkpoint loading, at test size
    sam = [f"+encoder.{k}={json.dumps(v)}" for k, v in _TINY_SAM.items()]
    return [f"sam_checkpoint={data['sam']}", "encoder.image_size=64", *sam, *common]


@pytest.mark.parametrize("config", ["roco_biomedclip", "roco_sam"])
def test_qformer_pretrain_config(config, tiny_towers, data, tmp_path):
    _ok("validate", f"qformer_pretrain/{config}")
    out = tmp_path / "out"
    text = _ok("run", "qformer_pretrain", "--config", config, f"output_dir={out}",
               *_qformer_overrides(config, tiny_towers, data))  # fmt: skip
    assert "3 pairs" in text  # the ROCO train/radiology rows
    assert "loss_itc" in text and "txt_r1" in text  # losses logged, validation recall scored
    from safetensors.torch import load_file

    sd = load_file(str(out / "epoch_0" / "model.safetensors"))
    assert sd["query_tokens"].shape[1] == 4 and "itm_head.weight" in sd
    assert (out / "epoch_0" / "qformer.json").is_file()
    assert (out / "epoch_0" / "retrieval.safetensors").is_file()


def _contrastive_overrides(config: str, towers: Path, data: dict) -> list[str]:
    data_dir = towers / "tiny_captions" if config == "caption_json" else data["roco"]
    return [f"data_dir={data_dir}", f"model.path={towers / 'tiny_biomedclip'}",
            f"model.text_model_dir={towers / 'tiny_bert'}", "epochs=1", "max_steps_per_epoch=1",
            "batch_size=3", "autocast=false", "device=cpu", "num_workers=0",
            "log_every_n_steps=1", "retrieval.k_test=2"]  # fmt: skip


@pytest.mark.parametrize("config", ["caption_json", "roco_biomedclip"])
def test_contrastive_pretrain_config(config, tiny_towers, data, tmp_path):
    _ok("validate", f"contrastive_pretrain/{config}")
    out = tmp_path / "out"
    text = _ok("run", "contrastive_pretrain", "--config", config, f"output_dir={out}",
               *_contrastive_overrides(config, tiny_towers, data))  # fmt: skip
    assert "retrieval | txt_r1:" in text
    ep = out / "epoch_0"
    for f in ("model.safetensors", "config.yaml", "retrieval.safetensors",
              "open_clip/open_clip_config.json", "open_clip/open_clip_pytorch_model.bin"):  # fmt: skip
        assert (ep / f).is_file(), f
    from safetensors.torch import load_file

    has_itm = any(k.startswith("itm.") for k in load_file(str(ep / "model.safetensors")))
    assert has_itm == (config == "caption_json")  # caption_json ships with the ITM head on


# ------------------------------------------------------------------------- zero-shot configs

# config -> (data key, dataset name in the rows, split in the rows)
_ZERO_SHOT = {
    "chestxray14_prompts": ("chestxray14", "chestxray14", "test"),
    "chestxray14_concepts": ("chestxray14", "chestxray14", "test"),
    "chestxray14_linear_probe": ("chestxray14", "chestxray14", "test"),
    "chexpert_prompts": ("chexpert", "chexpert", "valid"),
    "chexpert_concepts": ("chexpert", "chexpert", "valid"),
    "rsna_prompts": ("rsna", "rsna_pneumonia", "train"),
    "rsna_concepts": ("rsna", "rsna_pneumonia", "train"),
    "siim_prompts": ("siim", "siim_acr", "train"),
    "siim_concepts": ("siim", "siim_acr", "train"),
}


def _expected_labels(key: str, classes: list[str]) -> dict[str, dict[str, int]]:
    """Row id -> {class: 0|1} as the fixture wrote it (CheXpert: uncertain -> 1, the configs' policy)."""
    from medtune.testing import classification as fx

    if key == "chestxray14":
        pos = fx.CHESTXRAY14_FIXTURE["positives"]
        return {
            n[:-4]: {c: int(c in pos[n]) for c in classes} for n in fx.CHESTXRAY14_FIXTURE["test"]
        }
    if key == "chexpert":
        return {path[:-4]: {c: int(cells.get(c) in ("1.0", "-1.0")) for c in classes}
                for path, _, cells in fx.CHEXPERT_FIXTURE["valid"]}  # fmt: skip
    truth = fx.RSNA_FIXTURE if key == "rsna" else fx.SIIM_FIXTURE
    (cls,) = classes
    return {i: {cls: y} for i, y in truth.items()}


_RULES = {"prompts": "prompts_vs_negative_softmax", "concepts": "concepts_vs_normal_softmax_mean",
          "linear_probe": "linear_probe_sigmoid"}  # fmt: skip


@pytest.mark.parametrize("config", list(_ZERO_SHOT))
def test_zero_shot_config(config, tiny_towers, data, contrastive_ckpt, tmp_path):
    from omegaconf import OmegaConf

    _ok("validate", f"zero_shot_classify/{config}")
    key, dataset, split = _ZERO_SHOT[config]
    shipped = OmegaConf.load(Path(__file__).resolve().parents[2] / "recipes" / "configs"
                             / "zero_shot_classify" / f"{config}.yaml")  # fmt: skip
    classes, mode = list(shipped.classes), shipped.mode
    over = [f"data_dir={data[key]}", f"model.text_model_dir={tiny_towers / 'tiny_bert'}",
            "batch_size=2", "num_workers=0", "device=cpu"]  # fmt: skip
    if mode == "prompts":  # the tuned towers as an open_clip hub folder
        over.append(f"model.path={contrastive_ckpt / 'open_clip'}")
    else:  # the published towers + the contrastive checkpoint's weights
        over += [f"model.path={tiny_towers / 'tiny_biomedclip'}", f"checkpoint={contrastive_ckpt}"]
    if mode == "concepts":
        over.append(f"concepts.book={_concept_book(tmp_path / 'book.json', classes)}")
    if mode == "linear_probe":
        over.append("probe.epochs=3")
    out = tmp_path / "out"
    _ok("run", "zero_shot_classify", "--config", config, f"output_dir={out}", *over)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["labels"]) == set(r["scores"]) == set(classes) for r in rows)
    assert all(
        r["labels"][c] in (0, 1) and 0.0 <= r["scores"][c] <= 1.0 for r in rows for c in classes
    )
    assert {r["id"]: r["labels"] for r in rows} == _expected_labels(key, classes)
    assert {r["dataset"] for r in rows} == {dataset} and {r["split"] for r in rows} == {split}
    rule = _RULES[mode]
    assert {r["rule"] for r in rows} == {rule}
    assert json.loads((out / "metrics.json").read_text())["rule"] == rule
    if mode == "linear_probe":
        assert (out / "linear_probe" / "model.safetensors").is_file()
