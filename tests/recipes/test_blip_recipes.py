"""``blip_pretrain`` and ``blip_retrieval`` end to end through the CLI on tiny models.

- the pretraining demo config runs (ITC, ITM, LM logged), and ``blip_retrieval`` fine-tunes from
  its checkpoint (the decoder dropped by the key map) and evaluates as BLIP: re-ranked
  ``retrieval.safetensors`` and BLIP's ``itm_eval`` numbers;
- 2 gloo ranks x batch B equal 1 process x 2B (losses and weights; the queue, momentum copies
  and ITM draws included);
- a run killed mid-epoch and resumed equals the uninterrupted run (dropout on).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
MEDTUNE = Path(sys.executable).parent / "medtune"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from medtune.testing.blip import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny_blip")


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout + proc.stderr


def _cfg(recipe: str, assets: Path, out: Path, path: Path, **overrides) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / recipe / "demo.yaml"), resolve=False)
    cfg.update(assets_dir=str(assets), output_dir=str(out), epochs=1, max_steps_per_epoch=2)
    for k, v in overrides.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _run(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600
    )


def _inproc(*argv: str) -> None:
    """``medtune run ...`` in this process (no second interpreter start-up)."""
    from medtune._cli.main import main

    try:
        status = main(["run", *argv])
    except SystemExit as e:
        status = e.code
    assert status in (0, None)


def _state(out: Path) -> dict:
    return torch.load(out / "recipe_state.pt", weights_only=True)


def test_pretrain_demo_then_retrieval_from_its_checkpoint(assets, tmp_path, capsys):
    pre = _cfg("blip_pretrain", assets, tmp_path / "pre", tmp_path / "pre.yaml")
    _inproc("blip_pretrain", "--config", str(pre))
    text = capsys.readouterr().out
    for key in ("loss_itc", "loss_itm", "loss_lm"):
        assert key in text, key
    sd = load_file(str(tmp_path / "pre" / "epoch_0" / "model.safetensors"))
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in sd
    assert not any(".crossattention." in k for k in sd if k.startswith("text_decoder."))
    assert int(sd["queue_ptr"]) == 16  # 2 steps x global batch 8 enqueued
    hist = _state(tmp_path / "pre")["loss_history"]
    assert len(hist) == 2 and all(h["loss_lm"] > 0 and h["loss_itm"] > 0 for h in hist)

    ret = _cfg("blip_retrieval", assets, tmp_path / "ret", tmp_path / "ret.yaml")
    init = f"init_from={tmp_path / 'pre' / 'epoch_0'}"
    _inproc("blip_retrieval", "--config", str(ret), init)
    text = capsys.readouterr().out
    assert "tensors from" in text and "epoch_0 val: txt_r1" in text and "best val_r_mean" in text
    from medtune.eval.retrieval_metrics import load_retrieval

    r = load_retrieval(tmp_path / "ret" / "epoch_0" / "retrieval.safetensors")
    assert r["sim_i2t"].shape == (6, 12) and r["sim_t2i"].shape == (12, 6)
    assert int((r["sim_i2t"] == -100).sum()) == 6 * (12 - 8)  # k_test 8 of 12 texts re-ranked
    assert r["txt2img"].tolist() == [i // 2 for i in range(12)]
    sd = load_file(str(tmp_path / "ret" / "epoch_0" / "model.safetensors"))
    assert not any(k.startswith("text_decoder.") for k in sd)


def test_two_ranks_equal_one_process_at_the_same_global_batch(assets, tmp_path):
    over = {"model.dropout": 0.0}
    two = _cfg(
        "blip_pretrain", assets, tmp_path / "two", tmp_path / "two.yaml", batch_size=4, **over
    )
    one = _cfg(
        "blip_pretrain", assets, tmp_path / "one", tmp_path / "one.yaml", batch_size=8, **over
    )
    args = [str(MEDTUNE), "run", "--nproc_per_node", "2", "blip_pretrain", "--config", str(two)]
    text = _ok(_run(args, tmp_path))
    assert "2 process(es)" in text and "global batch 8" in text
    _inproc("blip_pretrain", "--config", str(one))
    h2, h1 = _state(tmp_path / "two")["loss_history"], _state(tmp_path / "one")["loss_history"]
    assert len(h2) == len(h1) == 2
    for x, y in zip(h1, h2):
        for k in ("loss_itc", "loss_itm", "loss_lm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
    w2 = load_file(str(tmp_path / "two" / "epoch_0" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "one" / "epoch_0" / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        if k in ("image_queue", "text_queue", "idx_queue"):
            continue  # the same columns, enqueued in the ranks' order
        a, b = w1[k], w2[k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has a zero gradient (softmax ignores a constant per query); AdamW
            # normalises its float residue into a step of either sign: compare q and v only
            n = a.numel() // 3
            a, b = torch.cat([a[:n], a[2 * n :]]), torch.cat([b[:n], b[2 * n :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)
    for k in ("image_queue", "text_queue"):  # the same set of columns
        a, b = w1[k][:, :16], w2[k][:, :16]
        torch.testing.assert_close(
            a[:, a[0].argsort()], b[:, b[0].argsort()], rtol=1e-4, atol=1e-5, msg=k
        )


_CRASH = """
import os, runpy, sys
import torch
K, _orig, _calls = int(os.environ["CRASH_AT"]), torch.optim.AdamW.step, [0]

def step(self, *a, **k):
    _calls[0] += 1
    if _calls[0] == K:  # a hard kill before the K-th update
        os._exit(17)
    return _orig(self, *a, **k)

torch.optim.AdamW.step = step
sys.argv = [{recipe!r}, *sys.argv[1:]]
runpy.run_path({recipe!r}, run_name="__main__")
"""


def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run(assets, tmp_path, capsys):
    over = {"epochs": 2, "save_every_n_steps": 1, "model.dropout": 0.1}
    a = _cfg("blip_pretrain", assets, tmp_path / "a", tmp_path / "a.yaml", **over)
    b = _cfg("blip_pretrain", assets, tmp_path / "b", tmp_path / "b.yaml", **over)
    _inproc("blip_pretrain", "--config", str(a))
    wrapper = tmp_path / "crash.py"
    wrapper.write_text(_CRASH.format(recipe=str(REPO / "recipes" / "blip_pretrain.py")))
    proc = _run([sys.executable, str(wrapper), "--config", str(b)], tmp_path, CRASH_AT="4")
    assert proc.returncode == 17, proc.stderr[-3000:]
    st = _state(tmp_path / "b")
    assert st["checkpoint"] == "step_3" and st["epoch"] == 1 and st["batches_done"] == 1
    _inproc("blip_pretrain", "--config", str(b), "resume_from_checkpoint=True")
    assert "resumed from" in capsys.readouterr().out
    ha, hb = _state(tmp_path / "a")["loss_history"], _state(tmp_path / "b")["loss_history"]
    assert len(ha) == len(hb) == 4
    for x, y in zip(ha, hb):
        assert y == x  # bit for bit
    wa = load_file(str(tmp_path / "a" / "epoch_1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "epoch_1" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
