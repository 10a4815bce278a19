"""``qformer_pretrain`` (BLIP-2 stage 1) end to end through the CLI on tiny models, and stage 2's
merge of one stage-1 checkpoint per encoder.

- the demo config runs, logs each loss and the retrieval recall, writes the checkpoint layout;
- a run killed mid-epoch and resumed equals the uninterrupted run (dropout on: the RNG is restored);
- 2 gloo ranks x batch B equal 1 process x 2B (ITC gathered with gradient, deterministic ITM draws);
- the tiny two-encoder MedVLM loads both stage-1 checkpoints into its Q-Former connectors.
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

from medtune.testing.forkserver import write_kill_wrapper

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "qformer_pretrain.py"
DEMO = REPO / "recipes" / "configs" / "qformer_pretrain" / "demo.yaml"
MEDTUNE = Path(sys.executable).parent / "medtune"
TINY_DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def towers(tiny_towers):
    """The cached tiny towers (read-only here: every run writes under tmp_path)."""
    return tiny_towers


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


def _cfg(towers: Path, out: Path, path: Path, **overrides) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO), resolve=False)
    cfg.update(
        towers_dir=str(towers),
        output_dir=str(out),
        epochs=1,
        max_steps_per_epoch=2,
        batch_size=8,
        val_dataset=None,
    )
    for k, v in overrides.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _run(cli, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``args`` (``[MEDTUNE, ...]``) forked from the pre-imported ``medtune_cli`` server."""
    return cli.run_command(args, cwd=cwd, env=_env(**env), timeout=600)


def _state(out: Path) -> dict:
    return torch.load(out / "recipe_state.pt", weights_only=True)


def test_demo_runs_through_the_cli_with_losses_recall_and_checkpoint(towers, tmp_path, medtune_cli):
    val = {
        "_component_": "medtune.data.caption_json",
        "path": str(towers / "tiny_captions/val.json"),
    }
    cfg = _cfg(towers, tmp_path / "out", tmp_path / "c.yaml", val_dataset=val)
    text = _ok(
        _run(medtune_cli, [str(MEDTUNE), "run", "qformer_pretrain", "--config", str(cfg)], tmp_path)
    )
    for key in (
        "loss_itc",
        "loss_itm",
        "loss_itg",
        "txt_r1",
        "txt_r5",
        "txt_r10",
        "img_r1",
        "img_r10",
    ):
        assert key in text, key
    folder = tmp_path / "out" / "epoch_0"
    sd = load_file(str(folder / "model.safetensors"))
    assert {"query_tokens", "temp", "itm_head.weight", "ln_vision.weight"} <= set(sd)
    assert sd["query_tokens"].shape[1] == 8
    assert (folder / "qformer.json").is_file() and (folder / "config.yaml").is_file()
    from medtune.eval.retrieval_metrics import load_retrieval

    assert load_retrieval(folder / "retrieval.safetensors")["sim_i2t"].shape == (24, 24)
    hist = _state(tmp_path / "out")["loss_history"]
    assert len(hist) == 2 and all(0 < h["loss"] < 50 for h in hist)


def test_bad_key_is_one_line(towers, tmp_path, medtune_cli):
    cfg = _cfg(towers, tmp_path / "out", tmp_path / "c.yaml")
    proc = _run(
        medtune_cli,
        [str(MEDTUNE), "run", "qformer_pretrain", "--config", str(cfg), "+epochz=2"],
        tmp_path,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        "qformer_pretrain: error: config key(s) not known to qformer_pretrain: epochz"
        in proc.stderr
    )


def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run(towers, tmp_path, medtune_cli):
    # dropout on, so the restored torch RNG matters; 2 epochs, a kill in epoch 1 after step_3
    over = {"epochs": 2, "max_steps_per_epoch": 2, "save_every_n_steps": 1, "model.dropout": 0.1}
    a = _cfg(towers, tmp_path / "a", tmp_path / "a.yaml", **over)
    b = _cfg(towers, tmp_path / "b", tmp_path / "b.yaml", **over)
    _ok(_run(medtune_cli, [str(MEDTUNE), "run", "qformer_pretrain", "--config", str(a)], tmp_path))
    wrapper = write_kill_wrapper(RECIPE, tmp_path, exit_code=17)
    cmd = [str(MEDTUNE), "run", str(wrapper), "--config", str(b)]
    proc = _run(medtune_cli, cmd, tmp_path, MEDTUNE_TEST_KILL_AT_STEP="4")
    assert proc.returncode == 17, proc.stderr[-3000:]
    st = _state(tmp_path / "b")
    assert st["checkpoint"] == "step_3" and st["epoch"] == 1 and st["batches_done"] == 1
    text = _ok(
        _run(
            medtune_cli,
            [
                str(MEDTUNE),
                "run",
                "qformer_pretrain",
                "--config",
                str(b),
                "resume_from_checkpoint=True",
            ],
            tmp_path,
        )
    )
    assert "resumed from" in text
    ha, hb = _state(tmp_path / "a")["loss_history"], _state(tmp_path / "b")["loss_history"]
    assert len(ha) == len(hb) == 4
    for x, y in zip(ha, hb):
        assert y == pytest.approx(x, rel=1e-6, abs=0)
    wa = load_file(str(tmp_path / "a" / "epoch_1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "epoch_1" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)


def test_two_ranks_equal_one_process_at_the_same_global_batch(towers, tmp_path, medtune_cli):
    over = {"max_steps_per_epoch": 2, "model.dropout": 0.0}
    two = _cfg(towers, tmp_path / "two", tmp_path / "two.yaml", batch_size=4, **over)
    one = _cfg(towers, tmp_path / "one", tmp_path / "one.yaml", batch_size=8, **over)
    text = _ok(
        _run(
            medtune_cli,
            [
                str(MEDTUNE),
                "run",
                "--nproc_per_node",
                "2",
                "qformer_pretrain",
                "--config",
                str(two),
            ],
            tmp_path,
        )
    )
    assert "2 process(es)" in text and "global batch 8" in text
    _ok(
        _run(medtune_cli, [str(MEDTUNE), "run", "qformer_pretrain", "--config", str(one)], tmp_path)
    )
    h2, h1 = _state(tmp_path / "two")["loss_history"], _state(tmp_path / "one")["loss_history"]
    assert len(h2) == len(h1) == 2
    for x, y in zip(h1, h2):
        for k in ("loss_itc", "loss_itm", "loss_itg"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
    w2 = load_file(str(tmp_path / "two" / "epoch_0" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "one" / "epoch_0" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=5e-5, msg=k)


def test_merged_two_encoder_model_loads_both_stage1_checkpoints(towers, tiny_assets, stage1):
    from medtune.models.blip2.builders import tiny_msmedcap_blip2
    from medtune.testing.towers import TINY_BERT
    from medtune.training.stage1 import stage1_state_dict

    runs = stage1
    sizes = {k: TINY_BERT[k] for k in TINY_DIMS}
    model = tiny_msmedcap_blip2(
        str(tiny_assets), str(towers / "tiny_biomedclip"), num_query_tokens=8, sizes=sizes
    )
    mapping = {enc: str(folder) for enc, folder in runs.items()}
    proj_before = model.connectors["sam"].proj.weight.clone()
    full = stage1_state_dict(model, mapping)  # what vision_finetune adds to the loader's state dict
    missing, unexpected = model.load_state_dict(full, strict=False)
    assert not unexpected
    names = list(full)
    own = dict(model.named_parameters())
    for enc in runs:
        sd = load_file(str(runs[enc] / "model.safetensors"))
        mine = [n for n in names if n.startswith(f"connectors.{enc}.")]
        assert (
            len(mine) == sum(1 for n, _ in model.connectors[enc].named_parameters()) - 2
        )  # all but proj
        for n in mine:
            assert torch.equal(own[n], sd[n.removeprefix(f"connectors.{enc}.")]), n
    assert torch.equal(
        model.connectors["sam"].proj.weight, proj_before
    )  # the projection starts new
    images = {"sam": torch.randn(1, 3, 64, 64), "clip": torch.randn(1, 3, 32, 32)}
    assert model.encode_images(images).shape == (1, 16, model.embed_dim)
    with pytest.raises(Exception, match="init_from.nope"):
        stage1_state_dict(model, {"nope": mapping["sam"]})
    with pytest.raises(ValueError, match="ln_vision"):
        stage1_state_dict(
            model, {"clip": mapping["sam"]}
        )  # a SAM (256-d) checkpoint into the CLIP connector


# ----------------------------------------------------------------------------- stage 2 configs
@pytest.fixture(scope="module")
def stage1(towers, tmp_path_factory, medtune_cli) -> dict[str, Path]:
    """One-step stage-1 runs on the tiny towers: a SAM Q-Former and a CLIP Q-Former."""
    tmp = tmp_path_factory.mktemp("stage1")
    sam = {"_component_": "medtune.models.encoders.tiny_sam_vision"}
    runs = {
        "sam": _cfg(
            towers, tmp / "sam", tmp / "sam.yaml", encoder=sam, max_steps_per_epoch=1, epochs=1
        ),
        "clip": _cfg(towers, tmp / "clip", tmp / "clip.yaml", max_steps_per_epoch=1, epochs=1),
    }
    for cfg in runs.values():
        _ok(_run(medtune_cli, [str(MEDTUNE), "run", "qformer_pretrain", "--config", str(cfg)], tmp))
    return {enc: tmp / enc / "epoch_0" for enc in runs}


def _stage2_data(name: str, tmp_path: Path) -> tuple[str, list[str]]:
    """The data folder a stage-2 config reads, as its users download it (tiny)."""
    if name == "roco_msmedcap":
        from PIL import Image

        folder = tmp_path / "roco-dataset" / "data" / "train" / "radiology"
        (folder / "images").mkdir(parents=True)
        caps, links = [], []
        for i in range(4):
            caps.append(f"ROCO_{i:05d}\t Axial CT of the abdomen number {i}.")
            links.append(f"ROCO_{i:05d}\twget -r ftp://x/PMC{i}.tar.gz -P /d\tfig{i}.jpg")
            Image.new("L", (16, 16), 40 * i).save(folder / "images" / f"PMC{i}_fig{i}.jpg")
        (folder / "captions.txt").write_text("\n".join(caps) + "\n")
        (folder / "dlinks.txt").write_text("\n".join(links) + "\n")
        return str(tmp_path / "roco-dataset"), []
    if name == "openi_qformer":
        from medtune.testing.reports import make_xraygpt_fixture

        return str(make_xraygpt_fixture(tmp_path)), []
    from medtune.testing.reports import make_mimic_cxr_fixture

    return str(make_mimic_cxr_fixture(tmp_path)), []


@pytest.mark.parametrize("name", ["roco_msmedcap", "openi_qformer", "mimic_cxr_report"])
def test_stage2_configs_run_through_the_cli(
    name, stage1, towers, tiny_assets, tmp_path, medtune_cli
):
    """The shipped stage-2 configs, pointed at tiny models and data in the download layouts: the
    Q-Former connector(s) start from the stage-1 checkpoint(s) (``init_from``) and train with
    Llama-3 frozen; XrayGPT's variant trains only the projection; every checkpoint holds the
    stage-1 Q-Former too, so it rebuilds the model on its own."""
    from medtune.testing.towers import TINY_BERT

    data_dir, extra = _stage2_data(name, tmp_path)
    sizes = "{" + ", ".join(f"{k}: {TINY_BERT[k]}" for k in TINY_DIMS) + "}"
    if name == "roco_msmedcap":
        model = [
            "model._component_=medtune.models.blip2.builders.tiny_msmedcap_blip2",
            f"+model.clip_path={towers / 'tiny_biomedclip'}",
            "~model.encoder_path",
            "~model.sam_checkpoint",
            f"init_from.sam={stage1['sam']}",
            f"init_from.clip={stage1['clip']}",
        ]
    else:
        model = [
            "model._component_=medtune.models.blip2.builders.tiny_blip2_medvlm",
            f"model.encoder_path={towers / 'tiny_biomedclip'}",
            f"init_from.image={stage1['clip']}",
        ]
    out = tmp_path / "out"
    cmd = [
        str(MEDTUNE), "run", "vision_finetune", "--config", name,
        f"data_dir={data_dir}", f"model_dir={tiny_assets / 'llama3_tiny'}", f"output_dir={out}",
        *model, f"+model.assets_dir={tiny_assets}", "model.num_query_tokens=8", f"+model.sizes={sizes}",
        f"tokenizer.path={tiny_assets / 'llama3_tiny/original/tokenizer.model'}",
        f"+tokenizer.special_tokens_path={tiny_assets / 'llama3_tiny/tokenizer.json'}",
        "checkpointer.checkpoint_files=[model.safetensors]", "llm_dtype=fp32", "autocast=false",
        "device=cpu", "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "val_dataset=null",
        "max_seq_len=256", *extra,
    ]  # fmt: skip
    text = _ok(_run(medtune_cli, cmd, tmp_path))
    assert "training samples" in text
    saved = load_file(str(out / "epoch_0" / "model.safetensors"))
    encs = ("sam", "clip") if name == "roco_msmedcap" else ("image",)
    for enc in encs:
        src = stage1["sam" if enc == "sam" else "clip"]
        sd = load_file(str(src / "model.safetensors"))
        qformer = [k for k in saved if k.startswith(f"connectors.{enc}.") and ".proj." not in k]
        assert qformer, sorted(saved)[:5]
        for k in qformer:
            key = k.removeprefix(f"connectors.{enc}.")
            if name == "openi_qformer":  # frozen: the stage-1 tensors unchanged
                assert torch.equal(saved[k], sd[key]), k
    if name == "openi_qformer":
        state = torch.load(out / "recipe_state.pt", weights_only=True)
        trained = {p for g in state["optimizer"]["param_groups"] for p in g["params"]}
        assert len(trained) == 2  # the projection's weight and bias only
