"""``mavl_finetune`` demo configs: classification from a pretrained trunk (test predictions scored by
``medtune score``), a run SIGKILLed mid-epoch and resumed equal to the uninterrupted one bit for bit,
2 gloo ranks x B equal to 1 process x 2B, and ResUNet segmentation (MAVL's Dice in metrics.json).
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


def _run(cli, *argv: str, cwd: Path, nproc: int = 1, kill_at_step: int | None = None):
    """``medtune <argv>`` in a forked copy of the pre-imported process (``medtune_cli``: ranks as
    torchrun's standalone launch); with ``kill_at_step`` the recipe SIGKILLs itself at that step."""
    env = None
    if kill_at_step:
        wrapper = write_kill_wrapper(REPO / "recipes" / f"{argv[1]}.py", Path(cwd))
        argv, env = (
            (argv[0], str(wrapper), *argv[2:]),
            {"MEDTUNE_TEST_KILL_AT_STEP": str(kill_at_step)},
        )
    return cli.run(*argv, cwd=cwd, env=env, nproc=nproc, timeout=600)


def _ok(cli, *argv: str, cwd: Path, nproc: int = 1) -> str:
    p = _run(cli, *argv, cwd=cwd, nproc=nproc)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


# 8 training images (label_fraction 0.5) in batches of 2: 4 steps per epoch, 2 epochs
CLF = [
    "--config",
    "demo_classification",
    "label_fraction=0.5",
    "batch_size=2",
    "save_every_n_steps=3",
]


def _steps(text: str) -> list[str]:
    return re.findall(r"^step (\d+ \| loss:\S+)", text, flags=re.M)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A tiny pretrained MAVL folder (``mavl_pretrain``'s names) the fine-tuning starts from."""
    from medtune.models.mavl import build_mavl
    from medtune.training.checkpointing import save_trained

    torch.manual_seed(1)
    model = build_mavl(entities=["a"], n_concepts=2, text_width=8, block="basic", blocks=[1, 1, 1], width=4,
                       image_size=64, pool_heads=2, d_model=8, heads=2, num_layers=1, dim_feedforward=16)  # fmt: skip
    path = tmp_path_factory.mktemp("pre") / "pre"
    save_trained({k: v.contiguous() for k, v in model.state_dict().items()}, path, "x: 1\n")
    return path, model.state_dict()


@pytest.fixture(scope="module")
def clf(medtune_cli, pre, tmp_path_factory):
    """The uninterrupted classification run: (output folder, its stdout)."""
    tmp = tmp_path_factory.mktemp("clf")
    out = tmp / "clf"
    text = _ok(medtune_cli, "run", "mavl_finetune", *CLF, f"assets_dir={build_cached_tiny_mavl()}", f"output_dir={out}",
              f"pretrained={pre[0]}", cwd=tmp)  # fmt: skip
    return out, text


def test_classification_from_pretrained_trunk(medtune_cli, pre, clf, tmp_path):
    out, text = clf
    assert (
        "classification: 8 training images (label_fraction 0.5)" in text
        and "test (best epoch" in text
    )
    assert len(_steps(text)) == 8
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["task"] == "classification" and m["best_epoch"] in (0, 1) and 0 <= m["auroc_macro"] <= 1
    )
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]["scores"]) == {"Pneumonia"}
    assert "f1_max_mavl" in _ok(medtune_cli, "score", str(out / "predictions.jsonl"), cwd=tmp_path)
    # the trunk started from the pretrained weights: after 8 small steps it is still close to them
    got = load_file(str(out / "epoch_0" / "model.safetensors"))
    w0 = pre[1]["image.trunk.conv1.weight"]
    assert (got["trunk.conv1.weight"] - w0).abs().max() < 0.05 < w0.abs().max()


def test_classification_killed_and_resumed_equals_uninterrupted(medtune_cli, pre, clf, tmp_path):
    ref, ref_text = clf
    out = tmp_path / "killed"
    args = ["run", "mavl_finetune", *CLF, f"assets_dir={build_cached_tiny_mavl()}", f"output_dir={out}",
            f"pretrained={pre[0]}"]  # fmt: skip
    proc = _run(medtune_cli, *args, cwd=tmp_path, kill_at_step=7)
    assert proc.returncode == -9, proc.stderr[-3000:]
    state = torch.load(out / "recipe_state.pt", weights_only=True)
    assert state["checkpoint"] == "step_6" and state["epoch"] == 1 and state["batches_done"] == 2
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1  # every rank's RNG state
    text = _ok(medtune_cli, *args, "resume_from_checkpoint=True", cwd=tmp_path)
    assert _steps(text) == _steps(ref_text)[6:]  # steps 7 and 8, losses exactly
    for name in ("epoch_1", "epoch_0"):
        a, b = (load_file(str(d / name / "model.safetensors")) for d in (ref, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "predictions.jsonl").read_text() == (ref / "predictions.jsonl").read_text()


def test_classification_two_ranks_equal_one_process(medtune_cli, pre, tmp_path):
    """Augmentation off, batch-norm statistics over both ranks (``sync_batchnorm``), SGD: equal
    gradients give equal weights; validation and test predictions gathered from both ranks."""
    over = [f"assets_dir={build_cached_tiny_mavl()}", f"pretrained={pre[0]}", "--config", "demo_classification",
            "label_fraction=0.5", "epochs=1", "augment=null", "sync_batchnorm=true",
            "optimizer._component_=torch.optim.SGD", "~optimizer.weight_decay"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    t2 = _ok(
        medtune_cli,
        "run",
        "mavl_finetune",
        *over,
        "batch_size=2",
        f"output_dir={two}",
        cwd=tmp_path,
        nproc=2,
    )
    t1 = _ok(
        medtune_cli,
        "run",
        "mavl_finetune",
        *over,
        "batch_size=4",
        f"output_dir={one}",
        cwd=tmp_path,
    )
    l1, l2 = _steps(t1), _steps(t2)
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        assert float(a.split(":")[1]) == pytest.approx(float(b.split(":")[1]), rel=1e-4)
    w1, w2 = (load_file(str(d / "epoch_0" / "model.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], msg=k)
    r1, r2 = (
        [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
        for d in (one, two)
    )
    assert [r["id"] for r in r1] == [r["id"] for r in r2] and len(r1) == 12
    for a, b in zip(r1, r2):
        assert a["scores"]["Pneumonia"] == pytest.approx(
            b["scores"]["Pneumonia"], rel=1e-4, abs=1e-6
        )


def test_segmentation_demo(medtune_cli, tmp_path):
    out = tmp_path / "seg"
    text = _ok(medtune_cli, "run", "mavl_finetune", "--config", "demo_segmentation", f"assets_dir={build_cached_tiny_mavl()}",
              f"output_dir={out}", cwd=tmp_path)  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "segmentation" and m["n_pos"] + m["n_neg"] == 12 and 0 <= m["dice"] <= 1
    assert "val_dice" in text and (out / "epoch_1" / "model.safetensors").is_file()
