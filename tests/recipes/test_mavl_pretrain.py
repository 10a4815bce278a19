"""``mavl_pretrain`` and ``zero_shot_classify mode=mavl`` end to end through the CLI on the tiny
MAVL assets: a demo run + zero-shot scoring of its checkpoint; 2 gloo ranks x B equal 1 process x
2B; a run SIGKILLed mid-epoch and resumed equals the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.testing.mavl import build_cached_tiny_mavl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MEDTUNE = Path(sys.executable).parent / "medtune"
RECIPE = REPO / "recipes" / "mavl_pretrain.py"

_KILL_WRAPPER = """
import os, runpy, signal, sys
import torch

K = int(os.environ["MEDTUNE_TEST_KILL_AT_STEP"])
_orig, _calls = torch.optim.AdamW.step, [0]

def step(self, *a, **k):
    _calls[0] += 1
    if _calls[0] == K:
        os.kill(os.getpid(), signal.SIGKILL)
    return _orig(self, *a, **k)

torch.optim.AdamW.step = step
sys.argv = [{recipe!r}, *sys.argv[1:]]
runpy.run_path({recipe!r}, run_name="__main__")
"""


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(MEDTUNE), *args], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


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


def test_demo_pretrain_then_zero_shot_through_cli(assets, tmp_path):
    out = tmp_path / "pre"
    text = _ok(
        _run(
            "run", "mavl_pretrain", "--config", "demo", f"assets_dir={assets}", f"output_dir={out}"
        )
    )
    assert "75 entities x 3 concepts" in text and "step 6 |" in text
    sd = load_file(str(out / "epoch_1" / "model.safetensors"))
    assert "decoder.layers.1.multihead_attn.in_proj_weight" in sd and sd["temp"].shape == (3,)
    assert len(_losses(out)) == 6 and (out / "plots").is_dir()
    zs = tmp_path / "zs"
    text = _ok(_run("run", "zero_shot_classify", "--config", "demo_mavl", f"assets_dir={assets}",
                    f"output_dir={zs}", f"checkpoint={out / 'epoch_1'}"))  # fmt: skip
    assert "mavl_presence_softmax: auroc_macro" in text
    rows = [json.loads(x) for x in (zs / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]["scores"]) == {"Nodule", "Mass"}
    assert all(0 < v < 1 for r in rows for v in r["scores"].values())
    p = _run("score", str(zs / "predictions.jsonl"))
    assert p.returncode == 0 and "f1_max_mavl" in p.stdout
    # zero-shot grounding on MAVL's RSNA split layout (boxes), overlays on request
    gr = tmp_path / "gr"
    text = _ok(_run("run", "zero_shot_classify", "--config", "demo_mavl_rsna_grounding", f"assets_dir={assets}",
                    f"output_dir={gr}", f"checkpoint={out / 'epoch_1'}"))  # fmt: skip
    res = json.loads((gr / "grounding.json").read_text())["Pneumonia"]
    assert res["entity"] == "pneumonia" and res["n"] == 10 and 0 <= res["pointing_game"] <= 1
    assert set(res["dice"]) == {"0.05", "0.1", "0.2"} and "best_test_threshold_mavl" in res
    assert "grounding Pneumonia (pneumonia): 10 positive images" in text
    assert len(list((gr / "overlays" / "Pneumonia").glob("*.png"))) == 2


def test_two_ranks_equal_one_process(assets, tmp_path):
    """Dropout and augmentation off (dropout draws are per rank), batch-norm statistics over both
    ranks (``sync_batchnorm``); SGD so that equal weights mean equal gradients."""
    over = [f"assets_dir={assets}", "epochs=1", "max_steps=2", "model.dropout=0.0", "augment=null", "sync_batchnorm=true",
            "optimizer._component_=torch.optim.SGD", "~optimizer.weight_decay"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    _ok(_run("run", "--nproc_per_node", "2", "mavl_pretrain", "--config", "demo", *over, "batch_size=4",
             f"output_dir={two}"))  # fmt: skip
    _ok(
        _run("run", "mavl_pretrain", "--config", "demo", *over, "batch_size=8", f"output_dir={one}")
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


def test_killed_and_resumed_equals_uninterrupted(assets, tmp_path):
    common = ["--config", "demo", f"assets_dir={assets}", "epochs=2", "max_steps_per_epoch=3",
              "batch_size=8", "save_every_n_steps=2", "lr_scheduler.num_warmup_steps=2"]  # fmt: skip
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _ok(_run("run", "mavl_pretrain", *common, f"output_dir={ref}"))
    wrapper = tmp_path / "mavl_pretrain.py"  # the recipe's name: the CLI finds its configs
    wrapper.write_text(_KILL_WRAPPER.format(recipe=str(RECIPE)))
    p = _run(
        "run",
        str(wrapper),
        *common,
        f"output_dir={killed}",
        env=_env(MEDTUNE_TEST_KILL_AT_STEP="5"),
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    state = torch.load(killed / "recipe_state.pt", weights_only=True)
    assert state["checkpoint"] == "step_4" and state["epoch"] == 1 and state["batches_done"] == 1
    _ok(
        _run("run", "mavl_pretrain", *common, f"output_dir={killed}", "resume_from_checkpoint=True")
    )
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


def test_bad_entity_file_is_one_line(assets, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"/remote-home/x.jpg": {"labels_id": 999}}))
    p = _run("run", "mavl_pretrain", "--config", "demo", f"assets_dir={assets}", f"output_dir={tmp_path / 'o'}",
             f"dataset.json_files=[{bad}]")  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "labels_id is 999" in p.stderr and str(bad) in p.stderr
