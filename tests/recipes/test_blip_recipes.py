"""``blip_pretrain`` and ``blip_retrieval`` end to end on tiny models.

- the pretraining demo config runs (ITC, ITM, LM logged), and ``blip_retrieval`` fine-tunes from
  its checkpoint (the decoder dropped by the key map) and evaluates as BLIP: re-ranked
  ``retrieval.safetensors`` and BLIP's ``itm_eval`` numbers;
- for both recipes, 2 gloo ranks x batch B equal 1 process x 2B (losses and weights; the queue,
  momentum copies and ITM draws included; retrieval: the re-ranked matrices too, their rows split
  over the ranks);
- for both recipes, a run killed mid-epoch and resumed equals the uninterrupted run bit for bit
  (dropout on; retrieval: its evaluation after each epoch too).

The runs are the CLI's ``medtune run``: in this process, or (2 ranks, the killed run) in the
session's fork server (``medtune_cli``: ranks as torchrun's standalone launch); the imports are
paid once, not per run (a fresh interpreter costs 10-15 CPU-seconds).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medtune.testing.forkserver import write_kill_wrapper

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

QUEUES = ("image_queue", "text_queue", "idx_queue")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from medtune.testing.blip import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny_blip")


def _cfg(recipe: str, assets: Path, out: Path, **overrides) -> Path:
    """The demo config of ``recipe`` for a 2-step epoch into ``out``, saved as ``out.yaml``."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / recipe / "demo.yaml"), resolve=False)
    cfg.update(assets_dir=str(assets), output_dir=str(out), epochs=1, max_steps_per_epoch=2)
    for k, v in overrides.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    path = out.with_suffix(".yaml")
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _inproc(*argv: str) -> str:
    """``medtune run ...`` in this process; returns what it printed."""
    from medtune._cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            status = main(["run", *argv])
        except SystemExit as e:
            status = e.code
    assert status in (0, None), buf.getvalue()[-3000:]
    return buf.getvalue()


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def _state(out: Path) -> dict:
    return torch.load(out / "recipe_state.pt", weights_only=True)


def _weights(out: Path, tag: str = "epoch_0") -> dict[str, torch.Tensor]:
    return load_file(str(out / tag / "model.safetensors"))


# ----------------------------------------------------------------------------- 1 process
@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """Pretraining (demo, batch 8, 2 steps, dropout 0) and retrieval fine-tuning from its
    checkpoint, each in this process: the demo run of test 1 and the reference of test 2."""
    d = tmp_path_factory.mktemp("one")
    pre = _cfg("blip_pretrain", assets, d / "pre", **{"model.dropout": 0.0})
    pre_text = _inproc("blip_pretrain", "--config", str(pre))
    init = f"init_from={d / 'pre' / 'epoch_0'}"
    ret = _cfg("blip_retrieval", assets, d / "ret", **{"model.dropout": 0.0})
    ret_text = _inproc("blip_retrieval", "--config", str(ret), init)
    return d, pre_text, ret_text


def test_pretrain_demo_then_retrieval_from_its_checkpoint(one_process):
    d, pre_text, ret_text = one_process
    for key in ("loss_itc", "loss_itm", "loss_lm"):
        assert key in pre_text, key
    sd = _weights(d / "pre")
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in sd
    assert not any(".crossattention." in k for k in sd if k.startswith("text_decoder."))
    assert int(sd["queue_ptr"]) == 16  # 2 steps x global batch 8 enqueued
    hist = _state(d / "pre")["loss_history"]
    assert len(hist) == 2 and all(h["loss_lm"] > 0 and h["loss_itm"] > 0 for h in hist)

    assert "tensors from" in ret_text and "epoch_0 val: txt_r1" in ret_text
    assert "best val_r_mean" in ret_text
    from medtune.eval.retrieval_metrics import load_retrieval

    r = load_retrieval(d / "ret" / "epoch_0" / "retrieval.safetensors")
    assert r["sim_i2t"].shape == (6, 12) and r["sim_t2i"].shape == (12, 6)
    assert int((r["sim_i2t"] == -100).sum()) == 6 * (12 - 8)  # k_test 8 of 12 texts re-ranked
    assert r["txt2img"].tolist() == [i // 2 for i in range(12)]
    sd = _weights(d / "ret")
    assert not any(k.startswith("text_decoder.") for k in sd)


# ----------------------------------------------------------------------------- 2 ranks
def _assert_same_run(one: Path, two: Path, losses: tuple[str, ...]) -> None:
    """2 ranks x B == 1 process x 2B: the losses of every step and the weights after them."""
    h1, h2 = _state(one)["loss_history"], _state(two)["loss_history"]
    assert len(h2) == len(h1) == 2
    for x, y in zip(h1, h2):
        for k in losses:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
    w1, w2 = _weights(one), _weights(two)
    assert set(w1) == set(w2)
    for k in w1:
        if k in QUEUES:
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


def test_two_ranks_equal_one_process_at_the_same_global_batch(
    assets, one_process, medtune_cli, tmp_path
):
    d = one_process[0]
    pre = _cfg("blip_pretrain", assets, tmp_path / "pre", batch_size=4, **{"model.dropout": 0.0})
    ret = _cfg("blip_retrieval", assets, tmp_path / "ret", batch_size=4, **{"model.dropout": 0.0})
    init = f"init_from={d / 'pre' / 'epoch_0'}"  # the same start as the 1-process retrieval
    text = _ok(medtune_cli.run("run", "blip_pretrain", "--config", str(pre), nproc=2))
    assert "2 process(es)" in text and "global batch 8" in text
    _ok(medtune_cli.run("run", "blip_retrieval", "--config", str(ret), init, nproc=2))
    _assert_same_run(d / "pre", tmp_path / "pre", ("loss_itc", "loss_itm", "loss_lm"))
    _assert_same_run(d / "ret", tmp_path / "ret", ("loss_itc", "loss_itm"))
    # the evaluation's re-ranked rows were split over the 2 ranks and summed
    from medtune.eval.retrieval_metrics import load_retrieval

    r1 = load_retrieval(d / "ret" / "epoch_0" / "retrieval.safetensors")
    r2 = load_retrieval(tmp_path / "ret" / "epoch_0" / "retrieval.safetensors")
    for k in ("sim_i2t", "sim_t2i"):
        assert torch.equal(r1[k] == -100, r2[k] == -100), k  # the same top-k_test candidates
        torch.testing.assert_close(r2[k], r1[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- kill + resume
@pytest.mark.parametrize("recipe", ["blip_pretrain", "blip_retrieval"])
def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run(
    assets, recipe, medtune_cli, tmp_path
):
    over = {"epochs": 2, "save_every_n_steps": 1, "model.dropout": 0.1}
    a = _cfg(recipe, assets, tmp_path / "a", **over)
    b = _cfg(recipe, assets, tmp_path / "b", **over)
    _inproc(recipe, "--config", str(a))
    wrapper = write_kill_wrapper(REPO / "recipes" / f"{recipe}.py", tmp_path, exit_code=17)
    proc = medtune_cli.run(
        "run", str(wrapper), "--config", str(b), env={"MEDTUNE_TEST_KILL_AT_STEP": "4"}
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    st = _state(tmp_path / "b")
    assert st["checkpoint"] == "step_3" and st["epoch"] == 1 and st["batches_done"] == 1
    text = _inproc(recipe, "--config", str(b), "resume_from_checkpoint=True")
    assert "resumed from" in text
    sa, sb = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert len(sa["loss_history"]) == len(sb["loss_history"]) == 4
    for x, y in zip(sa["loss_history"], sb["loss_history"]):
        assert y == x  # bit for bit
    wa, wb = _weights(tmp_path / "a", "epoch_1"), _weights(tmp_path / "b", "epoch_1")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if recipe == "blip_retrieval":  # the evaluation after the resumed epoch, and the best epoch
        from medtune.eval.retrieval_metrics import load_retrieval

        ra = load_retrieval(tmp_path / "a" / "epoch_1" / "retrieval.safetensors")
        rb = load_retrieval(tmp_path / "b" / "epoch_1" / "retrieval.safetensors")
        assert torch.equal(ra["sim_i2t"], rb["sim_i2t"])
        assert torch.equal(ra["sim_t2i"], rb["sim_t2i"])
        assert sa["best"] == sb["best"] and sb["best"] is not None
