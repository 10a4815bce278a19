"""``contrastive_pretrain`` end to end on the tiny towers (BiomedCLIP layout, tiny BERT text tower).

- through the CLI (in this process; one run shared by the CLI and resume tests): checkpoint layout,
  retrieval file scored by ``medtune score``, the open_clip export loading in open_clip and as a
  MedVLM encoder;
- 2 gloo ranks x B (forked as torchrun sets them up: the ``medtune_cli`` fixture) equal 1 process x 2B (losses and weights), ITM with
  hard negatives included;
- resume after a stop reproduces the uninterrupted run exactly;
- the momentum-queue variant trains; bad config keys are one error line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medtune._cli.main import main as medtune_main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "contrastive_pretrain.py"
DEMO = REPO / "recipes" / "configs" / "contrastive_pretrain" / "demo.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def _medtune(*args: str) -> tuple[int, str, str]:
    """``medtune <args>`` in this process: (status, stdout, stderr). ``medtune run`` executes the
    recipe in-process and its ``sys.exit`` propagates; other commands return their status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = medtune_main(list(args))
        except SystemExit as e:
            status = e.code
    return int(status or 0), out.getvalue(), err.getvalue()


def _losses(out_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, itm) per logged step from the DiskLogger file."""
    rows = []
    for f in sorted((out_dir / "logs").glob("*.txt")):
        for line in f.read_text().splitlines():
            m, loss = re.match(r"Step (\d+) \|", line), re.search(r" loss:(\S+)", line)
            if m and loss:
                itm = re.search(r" itm:(\S+)", line)
                rows.append((int(m[1]), float(loss[1]), float(itm[1]) if itm else 0.0))
    return rows


def _run_inprocess(cfg: dict) -> None:
    mod = runpy.run_path(str(RECIPE))
    recipe = mod["ContrastivePretrainRecipe"](OmegaConf.create(cfg))
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


def _cfg(towers: Path, out: Path, **over) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO), resolve=False)
    cfg.update(assets_dir=str(towers), output_dir=str(out), epochs=1, batch_size=8)
    for k, v in over.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return cfg


# The run shared by the CLI test and the resume test: 2 epochs x 2 steps of 8, ITM on.
SHARED = dict(
    epochs=2, max_steps_per_epoch=2, batch_size=8, **{"model.itm": True, "loss.itm_weight": 1.0}
)


@pytest.fixture(scope="module")
def cli_run(tiny_towers, tmp_path_factory) -> tuple[Path, str]:
    """``medtune run contrastive_pretrain --config demo ...`` (in this process, 1 thread as the
    other runs here): (output_dir, its output)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status, stdout, stderr = _medtune("run", "contrastive_pretrain", "--config", "demo",
                                          f"assets_dir={tiny_towers}", f"output_dir={out}",
                                          *(f"{k}={str(v).lower()}" for k, v in SHARED.items()))  # fmt: skip
    finally:
        torch.set_num_threads(n)
    assert status == 0, f"exit {status}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return out, stdout + stderr


def test_cli_run_writes_checkpoint_retrieval_and_export(cli_run, tiny_towers, tmp_path):
    out, text = cli_run
    assert "retrieval | txt_r1:" in text
    ep = out / "epoch_1"
    for f in ("model.safetensors", "config.yaml", "retrieval.safetensors", "open_clip/open_clip_config.json",
              "open_clip/open_clip_pytorch_model.bin", "open_clip/vocab.txt"):  # fmt: skip
        assert (ep / f).is_file(), f
    r = load_file(str(ep / "retrieval.safetensors"))
    assert r["sim_i2t"].shape == (24, 24) and r["sim_t2i"].shape == (24, 24)  # ITM re-ranked: both
    assert (r["sim_i2t"] == -100).sum(1).eq(24 - 16).all()  # BLIP: outside the top k_test = -100
    status, stdout, stderr = _medtune("score", str(ep / "retrieval.safetensors"))
    assert status == 0, stderr
    scored = json.loads(stdout)
    assert list(scored) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                            "img_r_mean", "r_mean"]  # fmt: skip
    assert all(0 <= v <= 100 for v in scored.values())

    # the trained model equals its export loaded by open_clip itself and as a MedVLM encoder
    import open_clip

    from medtune.models.dual_encoder import open_clip_dual_encoder, tokenizer_for
    from medtune.models.encoders import open_clip_vision

    sd = load_file(str(ep / "model.safetensors"))
    ours = open_clip_dual_encoder(
        str(tiny_towers / "tiny_biomedclip"), str(tiny_towers / "tiny_bert"), itm=True
    )
    ours.load_state_dict(sd)
    assert not torch.equal(sd["clip.logit_scale"], torch.tensor(0.0))
    export = tmp_path / "open_clip"  # a copy: the shared run stays as written
    shutil.copytree(ep / "open_clip", export)
    cfg = json.loads((export / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = str(tiny_towers / "tiny_bert")  # offline config
    (export / "open_clip_config.json").write_text(json.dumps(cfg))
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    oc_tok = open_clip.get_tokenizer(f"local-dir:{export}")
    texts = ["ct scan, lesion in the upper left region.", "x ray scan, normal, no lesion."]
    tok = tokenizer_for(ours)(texts)
    torch.testing.assert_close(oc_tok(texts), tok)
    images = torch.randn(2, 3, 32, 32)
    oc.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            oc.encode_image(images, normalize=True), ours.encode_image(images)
        )
        torch.testing.assert_close(oc.encode_text(tok, normalize=True), ours.encode_text(tok))
        enc = open_clip_vision(str(export), output="pooled")
        torch.testing.assert_close(enc(images)[:, 0], ours.encode_image(images, normalize=False))


def test_two_ranks_equal_one_process(tiny_towers, tmp_path, medtune_cli):
    """N ranks x B with gathered features == 1 process x N*B: losses per step and final weights
    (SGD, so that weight equality checks the gradients without Adam amplifying rounding). 2 steps:
    the second starts from weights the first updated."""
    over = ["epochs=1", "max_steps=2", "model.itm=true", "loss.itm_weight=1.0", "optimizer._component_=torch.optim.SGD",
            "~optimizer.weight_decay", "clip_grad_norm=null"]  # fmt: skip
    out2 = tmp_path / "two"
    # 2 ranks forked from the pre-imported medtune_cli server, as torchrun --standalone sets them up
    _ok(medtune_cli.run("run", "contrastive_pretrain", "--config", "demo", f"assets_dir={tiny_towers}",
                        f"output_dir={out2}", "batch_size=8", *over, cwd=tmp_path, env=_env(), nproc=2))  # fmt: skip
    out1 = tmp_path / "one"
    cfg = _cfg(tiny_towers, out1, batch_size=16, max_steps=2, clip_grad_norm=None)
    cfg["model"]["itm"] = True
    cfg["loss"]["itm_weight"] = 1.0
    cfg["optimizer"] = {"_component_": "torch.optim.SGD", "lr": cfg["optimizer"]["lr"]}
    _run_inprocess(cfg)
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        assert a[0] == b[0]
        assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-5)
    w1, w2 = (
        load_file(str(out1 / "step_2" / "model.safetensors")),
        load_file(str(out2 / "step_2" / "model.safetensors")),
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], msg=k)


def test_resume_reproduces_uninterrupted_run(cli_run, tiny_towers, tmp_path, monkeypatch):
    """Stop at step 3 (mid epoch 1 of 2, 2 steps each), resume: the losses (ITC and ITM, whose hard
    negatives draw from a generator) and weights of the uninterrupted shared run."""
    full, _ = cli_run
    part = tmp_path / "part"
    monkeypatch.setenv("MEDTUNE_PLOTS", "1")  # the curves are checked (tests turn them off else)
    _run_inprocess(_cfg(tiny_towers, part, **SHARED, max_steps=3))
    assert sorted(p.name for p in part.iterdir()) == [
        "epoch_0",
        "logs",
        "plots",  # the curves drawn at epoch 0's end
        "recipe_state.pt",
        "step_3",
        "torchtune_config.yaml",  # the resolved config, logged once
    ]
    _run_inprocess(_cfg(tiny_towers, part, **SHARED, resume_from_checkpoint=True))
    want, got = _losses(full), _losses(part)
    assert [r[0] for r in want] == [1, 2, 3, 4] and all(r[2] > 0 for r in want)
    assert want == got
    a, b = (
        load_file(str(full / "epoch_1" / "model.safetensors")),
        load_file(str(part / "epoch_1" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_momentum_queue_variant_trains(tiny_towers, tmp_path):
    out = tmp_path / "q"
    _run_inprocess(
        _cfg(tiny_towers, out, max_steps_per_epoch=2, **{"momentum_queue.queue_size": 32})
    )
    state = torch.load(out / "recipe_state.pt", weights_only=True)
    assert int(state["queue"]["ptr"]) == (2 * 8) % 32
    assert state["queue"]["image_queue"].shape == (24, 32)
    assert len(_losses(out)) == 2


def test_bad_key_is_one_line(tiny_towers, tmp_path):
    status, _, stderr = _medtune(
        "run", "contrastive_pretrain", "--config", "demo", f"assets_dir={tiny_towers}", "+epochz=2"
    )
    assert status != 0 and "Traceback" not in stderr
    assert (
        "contrastive_pretrain: error: config key(s) not known to contrastive_pretrain: epochz"
        in stderr
    )
    assert len(stderr.strip().splitlines()) == 1, stderr
