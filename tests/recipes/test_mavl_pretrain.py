"""``mavl_pretrain`` and ``zero_shot_classify mode=mavl`` end to end through the CLI on the tiny
MAVL assets: a demo run + zero-shot scoring and grounding of its checkpoint; 2 gloo ranks x B equal
1 process x 2B; a run SIGKILLed mid-epoch and resumed equals the uninterrupted demo run bit for bit.
Runs fork from one pre-imported process (the ``medtune_cli`` fixture)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.testing.forkserver import write_kill_wrapper
from medtune.testing.mavl import build_cached_tiny_mavl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _run(cli, *argv: str, cwd: Path, nproc: int = 1, kill_at_step: int | None = None, env=None):
    """``medtune <argv>`` in a forked copy of the pre-imported process (``medtune_cli``: ranks as
    torchrun's standalone launch); with ``kill_at_step`` the recipe SIGKILLs itself at that step."""
    if kill_at_step:
        wrapper = write_kill_wrapper(REPO / "recipes" / f"{argv[1]}.py", Path(cwd))
        argv, env = (
            (argv[0], str(wrapper), *argv[2:]),
            {**(env or {}), "MEDTUNE_TEST_KILL_AT_STEP": str(kill_at_step)},
        )
    return cli.run(*argv, cwd=cwd, env=env, nproc=nproc, timeout=600)


def _ok(cli, *argv: str, cwd: Path, nproc: int = 1, env=None) -> str:
    p = _run(cli, *argv, cwd=cwd, nproc=nproc, env=env)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


# the demo with a checkpoint every 2 steps: the uninterrupted run the resume test compares with
COMMON = ["--config", "demo", "epochs=2", "max_steps_per_epoch=3", "batch_size=8",
          "save_every_n_steps=2", "lr_scheduler.num_warmup_steps=2"]  # fmt: skip


def _losses(out: Path) -> list[tuple[int, str]]:
    """(step, the logged ``loss ce cl global`` text) per step, exactly as written."""
    rows = []
    for f in sorted((out / "logs").glob("*.txt")):
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                vals = dict(kv.split(":") for kv in m[2].split() if ":" in kv)
                rows.append((int(m[1]), " ".join(vals[k] for k in ("loss", "ce", "cl", "global"))))
    return rows


@pytest.fixture(scope="module")
def assets() -> Path:
    return build_cached_tiny_mavl()


@pytest.fixture(scope="module")
def demo(medtune_cli, assets, tmp_path_factory) -> tuple[Path, str]:
    """The demo pretraining run (output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "pre"
    return out, _ok(
        medtune_cli,
        "run",
        "mavl_pretrain",
        *COMMON,
        f"assets_dir={assets}",
        f"output_dir={out}",
        cwd=tmp,
        env={"MEDTUNE_PLOTS": "1"},  # the curves are checked below (tests turn them off else)
    )


def test_demo_pretrain_then_zero_shot_through_cli(medtune_cli, assets, demo, tmp_path):
    out, text = demo
    assert "75 entities x 3 concepts" in text and "step 6 |" in text
    sd = load_file(str(out / "epoch_1" / "model.safetensors"))
    assert "decoder.layers.1.multihead_attn.in_proj_weight" in sd and sd["temp"].shape == (3,)
    assert len(_losses(out)) == 6 and (out / "plots" / "loss.png").is_file()
    zs = tmp_path / "zs"
    text = _ok(medtune_cli, "run", "zero_shot_classify", "--config", "demo_mavl", f"assets_dir={assets}",
              f"output_dir={zs}", f"checkpoint={out / 'epoch_1'}", cwd=tmp_path)  # fmt: skip
    assert "mavl_presence_softmax: auroc_macro" in text
    rows = [json.loads(x) for x in (zs / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]["scores"]) == {"Nodule", "Mass"}
    assert all(0 < v < 1 for r in rows for v in r["scores"].values())
    assert "f1_max_mavl" in _ok(medtune_cli, "score", str(zs / "predictions.jsonl"), cwd=tmp_path)
    # zero-shot grounding on MAVL's RSNA split layout (boxes), overlays on request
    gr = tmp_path / "gr"
    text = _ok(medtune_cli, "run", "zero_shot_classify", "--config", "demo_mavl_rsna_grounding", f"assets_dir={assets}",
              f"output_dir={gr}", f"checkpoint={out / 'epoch_1'}", cwd=tmp_path)  # fmt: skip
    res = json.loads((gr / "grounding.json").read_text())["Pneumonia"]
    assert res["entity"] == "pneumonia" and res["n"] == 10 and 0 <= res["pointing_game"] <= 1
    assert set(res["dice"]) == {"0.05", "0.1", "0.2"} and "best_test_threshold_mavl" in res
    assert "grounding Pneumonia (pneumonia): 10 positive images" in text
    assert len(list((gr / "overlays" / "Pneumonia").glob("*.png"))) == 2


def test_two_ranks_equal_one_process(medtune_cli, assets, tmp_path):
    """Dropout and augmentation off (dropout draws are per rank), batch-norm statistics over both
    ranks (``sync_batchnorm``); SGD so that equal weights mean equal gradients."""
    over = ["--config", "demo", f"assets_dir={assets}", "epochs=1", "max_steps=2", "model.dropout=0.0",
            "augment=null", "sync_batchnorm=true", "optimizer._component_=torch.optim.SGD",
            "~optimizer.weight_decay"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    _ok(
        medtune_cli,
        "run",
        "mavl_pretrain",
        *over,
        "batch_size=4",
        f"output_dir={two}",
        cwd=tmp_path,
        nproc=2,
    )
    _ok(
        medtune_cli,
        "run",
        "mavl_pretrain",
        *over,
        "batch_size=8",
        f"output_dir={one}",
        cwd=tmp_path,
    )
    l1, l2 = _losses(one), _losses(two)
    assert [r[0] for r in l1] == [1, 2] == [r[0] for r in l2]
    for a, b in zip(l1, l2):
        for x, y in zip(a[1].split(), b[1].split()):
            assert float(x) == pytest.approx(float(y), rel=1e-4, abs=1e-6)
    w1, w2 = (
        load_file(str(one / "step_2" / "model.safetensors")),
        load_file(str(two / "step_2" / "model.safetensors")),
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], msg=k)
    state = torch.load(two / "recipe_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG state, restored to that rank on resume


def test_killed_and_resumed_equals_uninterrupted(medtune_cli, assets, demo, tmp_path):
    ref, killed = demo[0], tmp_path / "killed"
    args = ["run", "mavl_pretrain", *COMMON, f"assets_dir={assets}", f"output_dir={killed}"]
    proc = _run(medtune_cli, *args, cwd=tmp_path, kill_at_step=5)
    assert proc.returncode == -9, proc.stderr[-3000:]
    state = torch.load(killed / "recipe_state.pt", weights_only=True)
    assert state["checkpoint"] == "step_4" and state["epoch"] == 1 and state["batches_done"] == 1
    _ok(medtune_cli, *args, "resume_from_checkpoint=True", cwd=tmp_path)
    want, got = _losses(ref), _losses(killed)
    assert [r[0] for r in want] == [1, 2, 3, 4, 5, 6]
    assert got[-2:] == want[-2:] and sorted(set(got)) == want  # the resumed steps 5, 6 exactly
    a, b = (
        load_file(str(ref / "epoch_1" / "model.safetensors")),
        load_file(str(killed / "epoch_1" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_entity_file_is_one_line(medtune_cli, assets, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"/remote-home/x.jpg": {"labels_id": 999}}))
    proc = _run(medtune_cli, "run", "mavl_pretrain", "--config", "demo", f"assets_dir={assets}",
                           f"output_dir={tmp_path / 'o'}", f"dataset.json_files=[{bad}]", cwd=tmp_path)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert "labels_id is 999" in text and str(bad) in text


def test_vit_backbone_pretrains_and_scores_through_cli(medtune_cli, assets, tiny_towers, tmp_path):
    """``backbone: vit`` end to end: the tiny open_clip ViT of the test assets as the image side,
    2 pretraining steps, then zero-shot scores of that checkpoint with MAVL's text mode; an image
    size the tower does not take is one error line."""
    vit = ["+model.backbone=vit", "+model.vision._component_=medtune.models.encoders.open_clip_vision",
           f"+model.vision.path={tiny_towers / 'tiny_biomedclip'}", f"assets_dir={assets}"]  # fmt: skip
    out = tmp_path / "vit"
    text = _ok(medtune_cli, "run", "mavl_pretrain", "--config", "demo", *vit, "image.image_size=32",
               "max_steps=2", f"output_dir={out}", cwd=tmp_path)  # fmt: skip
    assert "step 2 |" in text and "75 entities x 3 concepts" in text
    sd = load_file(str(out / "step_2" / "model.safetensors"))
    assert "image.tower.tower.conv1.weight" in sd and "image.global_proj.weight" in sd
    zs = tmp_path / "zs"
    text = _ok(medtune_cli, "run", "zero_shot_classify", "--config", "demo_mavl", *vit, "+mavl.mode=text",
               f"output_dir={zs}", f"checkpoint={out / 'step_2'}", cwd=tmp_path)  # fmt: skip
    assert "mavl_text_softmax: auroc_macro" in text
    rows = [json.loads(x) for x in (zs / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(0 < v < 1 for r in rows for v in r["scores"].values())
    bad = _run(medtune_cli, "run", "mavl_pretrain", "--config", "demo", *vit, f"output_dir={tmp_path / 'b'}",
               cwd=tmp_path)  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "image.image_size: 64 px, but the model's image side takes 32 px" in bad.stderr
