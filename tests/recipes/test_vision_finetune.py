"""``vision_finetune`` end to end on the tiny assets, like torchtune's recipe tests.

- through the CLI (``medtune run vision_finetune --config demo ...``) in a subprocess;
- in-process through the recipe class, to look at the frozen LLM;
- resume after a kill reproduces the uninterrupted run (tests/recipes/test_resume.py);
- 2 CPU processes (gloo) match 1 process with the same global batch, and both ranks hold identical
  trained weights;
- clear errors for bad input;
- the demo's gap (image vs blanked images) at a small scale.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medtune.utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "vision_finetune.py"
DEMO = REPO / "recipes" / "configs" / "vision_finetune" / "demo.yaml"
MEDTUNE = Path(sys.executable).parent / "medtune"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: keep each process to one thread
    env["TQDM_DISABLE"] = "1"
    return env


def _run(cli, cmd: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """``cmd`` (``[MEDTUNE, ...]``) forked from the pre-imported ``medtune_cli`` server;
    ``run --nproc_per_node N`` becomes N forked ranks set up as torchrun's standalone launch sets
    them up (the real torchrun launch of a real recipe: tests/recipes/test_eval.py
    ::test_eval_two_ranks_equals_one)."""
    return cli.run_command(cmd, cwd=cwd, env={**_env(), **env}, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


def _cfg(assets: Path, out: Path, **overrides) -> dict:
    """The demo config as a plain dict, pointed at the tiny assets and ``out``, small."""
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO), resolve=False)
    warmup = overrides.pop("warmup_steps", 1)
    cfg.update(
        assets_dir=str(assets),
        output_dir=str(out),
        epochs=1,
        max_steps_per_epoch=3,
        batch_size=8,
        log_every_n_steps=1,
        num_workers=0,
    )
    cfg["lr_scheduler"]["num_warmup_steps"] = warmup
    cfg.update(overrides)
    return cfg


def _write_cfg(cfg: dict, path: Path) -> Path:
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def _recipe_module() -> dict:
    return runpy.run_path(str(RECIPE), run_name="recipe")


def _recipe_in_process(cfg: dict):
    """Construct and set up the recipe class in this process (no CLI)."""
    mod = _recipe_module()
    recipe = mod["VisionFinetuneRecipe"](OmegaConf.create(cfg))
    recipe.setup()
    return recipe


def _state(out: Path) -> dict:
    return torch.load(out / "recipe_state.pt", map_location="cpu", weights_only=True)


def _demo_model(assets: Path):
    """The demo config's model (its encoder options included: ``feature_layer``)."""
    from torchtune import config

    cfg = OmegaConf.load(DEMO)
    cfg.assets_dir = str(assets)
    return config.instantiate(cfg.model)


def _expected_trained_keys(assets: Path) -> set[str]:
    m = _demo_model(assets)
    keys = {n for n, _ in m.named_parameters()}
    unused = {f"encoders.image.{n}" for n in m.encoders["image"].unused_parameters()}
    return {k for k in keys if k.startswith(("encoders.", "connectors."))} - unused


# ----------------------------------------------------------------------------- 2. end to end via the CLI
def test_cli_run_writes_trained_parts_config_and_logs(tiny_assets, tmp_path, medtune_cli):
    out = tmp_path / "run"
    proc = _run(
        medtune_cli,
        [
            str(MEDTUNE),
            "run",
            "vision_finetune",
            "--config",
            "demo",
            f"assets_dir={tiny_assets}",
            f"output_dir={out}",
            "epochs=1",
            "max_steps_per_epoch=3",
            "batch_size=8",
            "log_every_n_steps=1",
        ],
        cwd=tmp_path,
        MEDTUNE_PLOTS="1",  # curves are drawn (the test suite turns them off elsewhere)
    )
    text = _ok(proc)
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"loss.png", "lr.png"}

    # the parameter table, with the real counts of each part
    m = _demo_model(tiny_assets)
    counts = {"encoder": m.encoders, "connector": m.connectors, "llm": m.decoder}
    enc = m.encoders["image"]
    unused_numel = sum(p.numel() for n, p in enc.named_parameters() if n in enc.unused_parameters())
    assert unused_numel > 0
    for part, state in (("encoder", "full"), ("connector", "full"), ("llm", "frozen")):
        n = sum(p.numel() for p in counts[part].parameters())
        unused = unused_numel if part == "encoder" else 0
        trainable = (
            n - unused if state == "full" else 0
        )  # what the chosen output never uses (pooled projection, final norm) stays frozen
        assert re.search(rf"^{part}\s+{state}\s+{n:,} \(.*\)\s+{trainable:,}\s", text, re.M), (
            part,
            text[:3000],
        )

    # trained parts only: exactly the encoder + connector keys, no decoder keys
    sd = load_file(str(out / "epoch_0" / "model.safetensors"))
    assert set(sd) == _expected_trained_keys(tiny_assets)
    assert not any(k.startswith("decoder.") for k in sd)

    # the resolved config
    cfg = OmegaConf.load(out / "epoch_0" / "config.yaml")
    assert cfg.output_dir == str(out) and cfg.assets_dir == str(tiny_assets)
    assert "${" not in (out / "epoch_0" / "config.yaml").read_text()
    assert cfg.max_steps_per_epoch == 3

    # the loss is logged, per step, and finite
    logs = list((out / "logs").glob("*.txt"))
    assert len(logs) == 1
    losses = [float(x) for x in re.findall(r"\bloss:([0-9.eE+-]+)", logs[0].read_text())]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert _state(out)["loss_history"] == pytest.approx(losses)

    # the encoder was trained: its weights moved away from the open_clip folder's
    from medtune.models.encoders import open_clip_vision

    init = open_clip_vision(str(tiny_assets / "tiny_clip")).tower.state_dict()
    moved = [
        k
        for k, v in init.items()
        if f"encoders.image.tower.{k}" in sd and not torch.equal(sd[f"encoders.image.tower.{k}"], v)
    ]
    used = [
        k for k in init if not k.startswith(("ln_post", "proj"))
    ]  # pooled head unused for patch tokens
    assert set(used) <= set(moved)


def test_training_changes_trained_parts_and_keeps_llm_frozen(tiny_assets, tmp_path):
    cfg = _cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=2)
    recipe = _recipe_in_process(cfg)
    model = recipe.run.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(not p.requires_grad for p in model.decoder.parameters())
    recipe.train()
    recipe.cleanup()
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n.startswith("decoder."):
            assert torch.equal(p, before[n]), f"frozen LLM weight {n} changed"
    changed = [
        n
        for n, p in after.items()
        if n.startswith(("encoders.", "connectors.")) and not torch.equal(p, before[n])
    ]
    assert any(n.startswith("connectors.") for n in changed) and any(
        n.startswith("encoders.") for n in changed
    )
    # the LLM also matches the checkpoint on disk (nothing modified it while loading)
    from torchtune.training import FullModelHFCheckpointer

    ref = FullModelHFCheckpointer(
        checkpoint_dir=str(tiny_assets / "llama3_tiny"),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "llm"),
    ).load_checkpoint()["model"]
    for k, v in ref.items():
        assert torch.equal(after[f"decoder.{k}"], v), k
    saved = load_file(str(tmp_path / "run" / "epoch_0" / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, after[k]), k


def _losses_and_weights(cfg: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    recipe = _recipe_in_process(cfg)
    recipe.save_checkpoint = lambda tag: None
    recipe.train()
    recipe.cleanup()
    return recipe.run.loss_history, {
        n: p.detach().clone() for n, p in recipe.run.model.named_parameters() if p.requires_grad
    }


def test_gradient_accumulation_and_activation_checkpointing_match_plain_run(tiny_assets, tmp_path):
    common = dict(
        epochs=1, max_steps_per_epoch=2, val_dataset=None, shuffle=False, clip_grad_norm=None
    )
    ref_loss, ref_w = _losses_and_weights(
        _cfg(tiny_assets, tmp_path / "ref", batch_size=8, **common)
    )
    # 2 micro-batches of 4 = one batch of 8: the loss is the mean over the step's answer tokens
    acc_loss, acc_w = _losses_and_weights(
        _cfg(tiny_assets, tmp_path / "acc", batch_size=4, gradient_accumulation_steps=2, **common)
    )
    ac_loss, ac_w = _losses_and_weights(
        _cfg(
            tiny_assets,
            tmp_path / "ac",
            batch_size=8,
            enable_activation_checkpointing=True,
            **common,
        )
    )
    assert len(ref_loss) == len(acc_loss) == len(ac_loss) == 2
    assert acc_loss == pytest.approx(ref_loss, rel=1e-5)
    assert ac_loss == pytest.approx(ref_loss, rel=1e-6)
    for k in ref_w:
        torch.testing.assert_close(acc_w[k], ref_w[k], rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(ac_w[k], ref_w[k], rtol=1e-5, atol=1e-6)


def test_bf16_frozen_llm_keeps_fp32_trained_parts(tiny_assets, tmp_path):
    cfg = _cfg(
        tiny_assets, tmp_path / "bf16", llm_dtype="bf16", max_steps_per_epoch=2, val_dataset=None
    )
    recipe = _recipe_in_process(cfg)
    assert {p.dtype for p in recipe.run.model.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in recipe.run.model.encoders.parameters()} == {torch.float32}
    assert {p.dtype for p in recipe.run.model.connectors.parameters()} == {torch.float32}
    # the pretrained encoder weights are the file's fp32 values, not bf16-rounded copies
    from medtune.models.encoders import open_clip_vision

    ref = open_clip_vision(str(tiny_assets / "tiny_clip")).tower.state_dict()
    for k, v in recipe.run.model.encoders["image"].tower.state_dict().items():
        assert torch.equal(v, ref[k]), k
    recipe.train()
    recipe.cleanup()
    assert len(recipe.run.loss_history) == 2 and all(0 < x < 20 for x in recipe.run.loss_history)
    sd = load_file(str(tmp_path / "bf16" / "epoch_0" / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float32}


# 3. resume == uninterrupted: tests/recipes/test_resume.py (killed runs, every loss and tensor)


# ----------------------------------------------------------------------------- 4. distributed on CPU
_RANK_WRAPPER = """
SUPPORTS_DISTRIBUTED = True
import json, os, runpy, sys
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from medtune.training.checkpointing import full_tensor

if os.environ.get("MEDTUNE_TEST_CRASH_AT_STEP"):  # every rank dies hard before the K-th update
    K, _orig, _calls = int(os.environ["MEDTUNE_TEST_CRASH_AT_STEP"]), torch.optim.AdamW.step, [0]

    def step(self, *a, **k):
        _calls[0] += 1
        if _calls[0] == K:
            os._exit(17)
        return _orig(self, *a, **k)

    torch.optim.AdamW.step = step
mod = runpy.run_path({recipe!r}, run_name="recipe")
cfg = OmegaConf.load(sys.argv[sys.argv.index("--config") + 1])
cfg.resume_from_checkpoint = os.environ.get("MEDTUNE_TEST_RESUME") == "1"
recipe = mod["VisionFinetuneRecipe"](cfg)
recipe.setup()
recipe.train()
# every rank writes its own view of the trained weights (gathered from the FSDP shards)
sd = {{n: full_tensor(p.detach()).cpu().contiguous() for n, p in recipe.run.model.named_parameters() if p.requires_grad}}
local = {{n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in recipe.run.model.named_parameters() if p.requires_grad}}
out = os.path.join(cfg.output_dir, f"rank{{recipe.run.rank}}")
save_file(sd, out + ".safetensors")
json.dump({{"world_size": recipe.run.world_size, "losses": recipe.run.loss_history, "local_numel": sum(local.values())}},
          open(out + ".json", "w"))
recipe.cleanup()
"""


def test_two_cpu_ranks_match_one_process(tiny_assets, tmp_path, medtune_cli):
    wrapper = tmp_path / "rank_wrapper.py"
    wrapper.write_text(_RANK_WRAPPER.format(recipe=str(RECIPE)))
    common = dict(
        epochs=1,
        max_steps_per_epoch=3,
        save_every_n_steps=2,
        val_dataset=None,
        shuffle=True,
        device="cpu",
    )
    cfg2 = _write_cfg(
        _cfg(tiny_assets, tmp_path / "two", batch_size=4, **common), tmp_path / "two.yaml"
    )
    cfg1 = _write_cfg(
        _cfg(tiny_assets, tmp_path / "one", batch_size=8, **common), tmp_path / "one.yaml"
    )
    two = [str(MEDTUNE), "run", "--nproc_per_node", "2", str(wrapper), "--config", str(cfg2)]
    # 2 ranks, killed before the 3rd update (last state: step_2), then resumed: also covers resuming
    # FSDP2-sharded parameters and optimizer state
    crashed = _run(medtune_cli, two, tmp_path, MEDTUNE_TEST_CRASH_AT_STEP="3")
    assert crashed.returncode != 0 and _state(tmp_path / "two")["checkpoint"] == "step_2", (
        crashed.stderr[-3000:]
    )
    proc = _run(medtune_cli, two, tmp_path, MEDTUNE_TEST_RESUME="1")
    assert "resumed from" in _ok(proc)
    _ok(_run(medtune_cli, [str(MEDTUNE), "run", str(wrapper), "--config", str(cfg1)], cwd=tmp_path))

    meta = {r: json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)}
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert meta[0]["world_size"] == meta[1]["world_size"] == 2 and one["world_size"] == 1
    # trained parts are really sharded: each rank holds about half of them
    assert meta[0]["local_numel"] < 0.75 * one["local_numel"]
    # the same global-token-mean loss per step on both ranks and in one process with batch 2B
    assert len(one["losses"]) == 3
    assert meta[0]["losses"] == pytest.approx(meta[1]["losses"], rel=0, abs=0)
    assert meta[0]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    # both ranks hold identical trained weights, equal to the 1-process run's
    r0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    w1 = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    assert set(r0) == set(r1) == set(w1) == _expected_trained_keys(tiny_assets)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], w1[k], rtol=1e-4, atol=5e-5)  # Adam: ~lr-sized steps
    # and the recipe's own checkpoint (written by rank 0) holds the same gathered weights
    saved = load_file(str(tmp_path / "two" / "epoch_0" / "model.safetensors"))
    for k in r0:
        assert torch.equal(saved[k], r0[k]), k


def test_shard_llm_two_ranks_match_one_process(tiny_assets, tmp_path, medtune_cli):
    """``shard_llm: true``: the frozen LLM built on meta and FSDP2-sharded per layer on 2 ranks
    trains the encoder + connector exactly as one process with the same global batch."""
    common = [
        f"assets_dir={tiny_assets}",
        "epochs=1",
        "max_steps_per_epoch=2",
        "val_dataset=null",
        "lr_scheduler.num_warmup_steps=1",
        "log_every_n_steps=1",
    ]
    two = _ok(
        _run(
            medtune_cli,
            [
                str(MEDTUNE),
                "run",
                "--nproc_per_node",
                "2",
                "vision_finetune",
                "--config",
                "demo",
                *common,
                f"output_dir={tmp_path / 'two'}",
                "batch_size=4",
                "shard_llm=true",
            ],
            cwd=tmp_path,
        )
    )
    assert "2 process(es)" in two
    _ok(
        _run(
            medtune_cli,
            [
                str(MEDTUNE),
                "run",
                "vision_finetune",
                "--config",
                "demo",
                *common,
                f"output_dir={tmp_path / 'one'}",
                "batch_size=8",
            ],
            cwd=tmp_path,
        )
    )
    assert _state(tmp_path / "two")["loss_history"] == pytest.approx(
        _state(tmp_path / "one")["loss_history"], rel=1e-5, abs=1e-6
    )
    a = load_file(str(tmp_path / "two" / "epoch_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "epoch_0" / "model.safetensors"))
    assert (
        set(a) == set(b) == _expected_trained_keys(tiny_assets)
    )  # no LLM weight in the checkpoint
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)


def test_two_encoders_with_their_own_transforms_train(tiny_assets, tmp_path):
    """SAM-style (64 px) + open_clip (32 px) encoders, a Q-Former each: the recipe feeds each encoder
    its own image size, trains both Q-Formers, and the checkpoint reloads for generation."""
    from medtune.generation import generate
    from medtune.training.loading import load_from_checkpoint

    cfg = _cfg(
        tiny_assets,
        tmp_path / "dual",
        max_steps_per_epoch=2,
        val_dataset=None,
        model={
            "_component_": "medtune.models.builders.tiny_msmedcap",
            "assets_dir": str(tiny_assets),
        },
    )
    recipe = _recipe_in_process(cfg)
    assert recipe.run.model.image_transforms["sam"]["image_size"] == 64
    assert recipe.run.model.image_transforms["clip"]["image_size"] == 32
    before = {n: p.detach().clone() for n, p in recipe.run.model.connectors.named_parameters()}
    recipe.train()
    recipe.cleanup()
    after = dict(recipe.run.model.connectors.named_parameters())
    for name in ("sam", "clip"):
        assert any(
            not torch.equal(before[n], after[n]) for n in before if n.startswith(f"{name}.")
        ), name
    model, tok, _ = load_from_checkpoint(tmp_path / "dual" / "epoch_0")
    images = {"sam": torch.randn(1, 3, 64, 64), "clip": torch.randn(1, 3, 32, 32)}
    prompt = [1, 2] + [model.image_token_id] * model.tokens_per_image + [3]
    out = generate(
        model,
        [prompt],
        pad_id=tok.pad_id,
        stop_tokens=tok.stop_tokens,
        images=images,
        image_counts=torch.tensor([1]),
        max_new_tokens=3,
    )
    assert len(out) == 1 and len(out[0]) <= 3


def test_msmedcap_config_runs_through_the_cli_on_tiny_models(tiny_assets, tmp_path, medtune_cli):
    """``vision_finetune/slake_msmedcap`` as shipped, pointed at the tiny assets (its builder swapped
    for the tiny dual-encoder one): frozen encoders, both Q-Formers trained and saved."""
    out = tmp_path / "msm"
    proc = _run(
        medtune_cli,
        [
            str(MEDTUNE), "run", "vision_finetune", "--config", "slake_msmedcap",
            f"model_dir={tiny_assets / 'llama3_tiny'}", f"data_dir={tiny_assets / 'tiny_slake' / 'Slake1.0'}",
            f"output_dir={out}", "model._component_=medtune.models.builders.tiny_msmedcap",
            "~model.encoder_path", "~model.sam_checkpoint", f"+model.assets_dir={tiny_assets}",
            "model.num_queries=4", "checkpointer.checkpoint_files=[model.safetensors]", "llm_dtype=fp32",
            "autocast=false", "device=cpu", "epochs=1", "+max_steps_per_epoch=2", "batch_size=4",
            "num_workers=0", "val_dataset=null",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    text = _ok(proc)
    assert re.search(r"encoder\s+frozen", text), text[-2000:]
    assert re.search(r"connector\s+full", text), text[-2000:]
    saved = load_file(str(out / "epoch_0" / "model.safetensors"))
    assert {k.split(".")[1] for k in saved} == {"sam", "clip"}
    assert all(k.startswith("connectors.") for k in saved)


# ----------------------------------------------------------------------------- 5. bad input
def _slake_copy(tiny_assets: Path, dst: Path, n_rows: int = 6) -> Path:
    """A small private SLAKE folder (train = validation = test = the first rows)."""
    import shutil

    src = tiny_assets / "tiny_slake" / "Slake1.0"
    rows = json.loads((src / "train.json").read_text())[:n_rows]
    dst.mkdir(parents=True)
    for r in rows:
        (dst / "imgs" / Path(r["img_name"]).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "imgs" / r["img_name"], dst / "imgs" / r["img_name"])
    for split in ("train", "validation", "test"):
        (dst / f"{split}.json").write_text(json.dumps(rows))
    return dst


def _run_recipe_cli(
    cli, cfg: dict, tmp_path: Path, name: str = "bad.yaml"
) -> subprocess.CompletedProcess:
    return _run(
        cli,
        [str(MEDTUNE), "run", "vision_finetune", "--config", str(_write_cfg(cfg, tmp_path / name))],
        cwd=tmp_path,
    )


def _assert_clear_failure(proc: subprocess.CompletedProcess, *patterns: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in:\n{text[-3000:]}"
    return text


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_image_file_is_a_clear_error(tiny_assets, tmp_path, damage, medtune_cli):
    root = _slake_copy(tiny_assets, tmp_path / "Slake1.0")
    rows = json.loads((root / "train.json").read_text())
    bad = root / "imgs" / rows[0]["img_name"]
    if damage == "missing":
        bad.unlink()
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    cfg = _cfg(tiny_assets, tmp_path / "out", val_dataset=None, shuffle=False)
    cfg["dataset"] = {**cfg["dataset"], "root": str(root)}
    proc = _run_recipe_cli(medtune_cli, cfg, tmp_path)
    what = "no such file|not found|does not exist" if damage == "missing" else "cannot decode image"
    text = _assert_clear_failure(proc, re.escape(rows[0]["img_name"]), f"(?i){what}")
    assert "Traceback" not in text and "vision_finetune: error:" in text, text[-3000:]


def test_unknown_top_level_key_is_named(tiny_assets, tmp_path, medtune_cli):
    cfg = _cfg(tiny_assets, tmp_path / "out")
    cfg["learning_rate_typo"] = 1.0
    with pytest.raises(UserError, match="learning_rate_typo"):
        _recipe_module()["VisionFinetuneRecipe"](OmegaConf.create(cfg))
    proc = _run_recipe_cli(medtune_cli, cfg, tmp_path)
    text = _assert_clear_failure(
        proc, "config key\\(s\\) not known to vision_finetune: learning_rate_typo"
    )
    assert "Traceback" not in text


def test_tokenizer_model_mismatch_is_a_clear_error(tiny_assets, tmp_path):
    # a tokenizer whose specials sit elsewhere (as with another base vocabulary)
    added = json.loads((tiny_assets / "llama3_tiny" / "tokenizer.json").read_text())["added_tokens"]
    for t in added:
        t["id"] += 100
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    cfg = _cfg(tiny_assets, tmp_path / "out")
    cfg["tokenizer"] = {**cfg["tokenizer"], "special_tokens_path": str(tmp_path / "tokenizer.json")}
    with pytest.raises(UserError, match="tokenizer and model do not belong together"):
        _recipe_in_process(cfg)


def test_width_mismatch_is_a_clear_error(tiny_assets, tmp_path):
    """LLM weights of another width than the configured model: named parts, no deep trace."""
    # LLM weights from the wrong checkpoint (another width) must name the decoder
    other = tmp_path / "other_llm"
    other.mkdir()
    from safetensors.torch import save_file

    from medtune.models.llama3 import llama3_tiny

    hf_cfg = json.loads((tiny_assets / "llama3_tiny" / "config.json").read_text())
    small = llama3_tiny(vocab_size=hf_cfg["vocab_size"], embed_dim=32, num_heads=4, num_kv_heads=2)
    from torchtune.models.convert_weights import tune_to_hf

    save_file(
        {
            k: v.contiguous()
            for k, v in tune_to_hf(small.state_dict(), num_heads=4, num_kv_heads=2, dim=32).items()
        },
        str(other / "model.safetensors"),
    )
    (other / "config.json").write_text(json.dumps({**hf_cfg, "hidden_size": 32}))
    cfg2 = _cfg(tiny_assets, tmp_path / "out2")
    cfg2["checkpointer"] = {**cfg2["checkpointer"], "checkpoint_dir": str(other)}
    with pytest.raises(
        UserError,
        match=r"^LLM checkpoint \S*other_llm has width 32, the model expects 64$",
    ):
        _recipe_in_process(cfg2)


# ----------------------------------------------------------------------------- 6. the demo's gap, small
def _teacher_forced_accuracy(recipe, split: str) -> float:
    """Greedy next-token answers, teacher-forced over the answer tokens: right when the argmax at
    every answer position (and the closing <|eot_id|>) is the reference token."""
    from medtune.data import slake
    from medtune.data.collate import collate_vision_chat
    from medtune.data.model_transform import IGNORE_INDEX, MedVLMTransform, VisionChatDataset

    cfg = recipe.cfg
    samples = slake(root=cfg.dataset.root, split=split)
    tf = MedVLMTransform(
        recipe.run.tokenizer,
        image_token_id=recipe.run.model.image_token_id,
        tokens_per_image=recipe.run.model.tokens_per_image,
        image_transforms=recipe.run.model.image_transforms,
        prompt_template=cfg.prompt_template,
        blank_images=bool(cfg.blank_images),
    )
    ds = VisionChatDataset(samples, tf, train=False)
    right = total = 0
    recipe.run.model.eval()
    with torch.no_grad():
        for i in range(0, len(ds), 32):
            batch = collate_vision_chat(
                [ds[j] for j in range(i, min(i + 32, len(ds)))], pad_id=recipe.run.tokenizer.pad_id
            )
            logits = recipe.run.model(
                batch["tokens"], images=batch["images"], image_counts=batch["image_counts"]
            )
            pred = logits[:, :-1].argmax(-1)
            tgt = batch["labels"][:, 1:]
            ok = ((pred == tgt) | (tgt == IGNORE_INDEX)).all(dim=1)
            right += int(ok.sum())
            total += len(ok)
    return right / total


def test_demo_gap_images_beat_blanked_images(tiny_assets, tmp_path):
    accs = {}
    for blank in (False, True):
        cfg = _cfg(
            tiny_assets,
            tmp_path / f"blank{blank}",
            epochs=8,
            max_steps_per_epoch=None,
            batch_size=16,
            blank_images=blank,
            val_dataset=None,
            warmup_steps=5,
            log_every_n_steps=100,
            # no DiskLogger log, so no curves redrawn at each of the 16 epoch ends: this test is
            # about accuracy (curves: tests/viz, and every other recipe run here)
            metric_logger={"_component_": "torchtune.training.metric_logging.StdoutLogger"},
        )
        recipe = _recipe_in_process(cfg)
        recipe.save_checkpoint = lambda tag: None  # nothing to keep on disk here
        recipe.train()
        accs[blank] = _teacher_forced_accuracy(recipe, "test")
        recipe.cleanup()
    print(f"image accuracy: {accs[False]:.2f} | question-only baseline: {accs[True]:.2f}")
    assert accs[False] - accs[True] >= 0.30, accs
