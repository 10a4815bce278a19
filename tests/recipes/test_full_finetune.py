"""``full_finetune`` (one file for 1..N processes) end to end on the tiny assets.

- the ``demo`` and ``demo_text`` configs run through the CLI (``demo`` also on 2 ranks, forked as
  torchrun's standalone launch sets them up), and through the old names (aliases);
- resume after an interruption reproduces the uninterrupted run;
- 2 CPU processes (gloo, FSDP2, LLM built on meta and loaded shard by shard) with gradient
  accumulation give the same losses and weights as 1 process with the same global batch;
- the LLM export is HF layout (``transformers`` loads it) and the checkpoint folder rebuilds the
  trained model through ``medtune.training.loading.load_from_checkpoint``;
- the full-size configs bind and build on the meta device with Llama-3-8B's parameter count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medtune._cli.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
RECIPE = "full_finetune"
SMALL = [
    "val_dataset=null",
    "max_steps_per_epoch=2",
    "lr_scheduler.num_warmup_steps=1",
    "log_every_n_steps=1",
]
LLAMA3_8B = 8_030_261_248

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _run(recipe: str, config: str, *overrides: str, nproc: int = 0, cli=None) -> str:
    if not nproc:  # in this process: no interpreter start, no second torchtune import
        with pytest.raises(SystemExit) as e:
            main(["run", recipe, "--config", config, *overrides])
        assert e.value.code in (0, None)
        return ""
    # ranks forked from the pre-imported medtune_cli server, as torchrun --standalone sets them up
    proc = cli.run("run", recipe, "--config", config, *overrides, nproc=nproc, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _state(out: Path) -> dict:
    return torch.load(out / "recipe_state.pt", weights_only=True)


def _llm(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "llm" / "model.safetensors"))


def test_single_device_exports_rebuild_the_model(tiny_assets, tmp_path, capsys):
    """The LLM export loads in transformers and the epoch folder rebuilds the trained MedVLM
    (resume after a kill: tests/recipes/test_resume.py)."""
    ref = tmp_path / "ref"
    common = [f"assets_dir={tiny_assets}", "batch_size=8", *SMALL]
    _run(RECIPE, "demo", *common, f"output_dir={ref}", "epochs=2")
    out = capsys.readouterr().out
    assert "memory estimate per rank" in out and "llm        full" in out
    # the LLM folder is an HF checkpoint; the epoch folder rebuilds the trained MedVLM
    from transformers import LlamaForCausalLM

    from medtune.training.loading import load_from_checkpoint

    hf = LlamaForCausalLM.from_pretrained(
        str(ref / "epoch_1" / "llm"), torch_dtype=torch.float32
    ).eval()
    model, _, _ = load_from_checkpoint(ref / "epoch_1")
    tokens = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    trained = load_file(str(ref / "epoch_1" / "model.safetensors"))
    assert trained and all(
        k.startswith("connectors.") for k in trained
    )  # encoder frozen, LLM in llm/


def test_two_processes_equal_one(tiny_assets, tmp_path, medtune_cli):
    """2 ranks x batch 2 x 2 accumulation steps (FSDP2, gloo) == 1 process x batch 8."""
    common = [f"assets_dir={tiny_assets}", "epochs=1", *SMALL]
    _run(RECIPE, "demo", *common, f"output_dir={tmp_path / 'one'}", "batch_size=8")
    log = _run(
        RECIPE,
        "demo",
        *common,
        f"output_dir={tmp_path / 'two'}",
        "batch_size=2",  # 2 ranks x 2 x 2 steps
        "gradient_accumulation_steps=2",
        nproc=2,
        cli=medtune_cli,
    )
    assert "2 process(es)" in log and "memory estimate per rank (2 rank(s)" in log
    assert _state(tmp_path / "two")["loss_history"] == pytest.approx(
        _state(tmp_path / "one")["loss_history"], abs=1e-5
    )
    a, b = _llm(tmp_path / "one" / "epoch_0"), _llm(tmp_path / "two" / "epoch_0")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_text_only_full_sft(tiny_assets, tmp_path, capsys):
    _run(
        RECIPE,
        "demo_text",
        f"assets_dir={tiny_assets}",
        f"output_dir={tmp_path}",
        "epochs=1",
        "batch_size=8",
        *SMALL,
    )
    out = capsys.readouterr().out
    assert "encoder" not in out.split("memory estimate")[0]  # a bare decoder: one part, the LLM
    assert len(_state(tmp_path)["loss_history"]) == 2
    assert (tmp_path / "epoch_0" / "llm" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- configs
_CONFIGS = sorted((RECIPE, p.stem) for p in (CONFIGS / RECIPE).glob("*.yaml"))


@pytest.mark.parametrize(("recipe", "name"), _CONFIGS)
def test_config_keys_known_and_components_bind(recipe, name):
    import runpy

    from medtune._cli.validate import collect_problems

    KNOWN_KEYS = runpy.run_path(str(CONFIGS.parent / f"{recipe}.py"), run_name="recipe")[
        "KNOWN_KEYS"
    ]
    cfg = OmegaConf.load(CONFIGS / recipe / f"{name}.yaml")
    assert set(cfg.keys()) <= KNOWN_KEYS, set(cfg.keys()) - KNOWN_KEYS
    assert cfg.trainable.llm == "full"
    assert collect_problems(OmegaConf.to_container(cfg, resolve=True)) == []


@pytest.mark.parametrize(
    "name", ["slake", "vqa_rad", "slake_single_device", "vqa_rad_single_device"]
)
def test_full_size_model_on_meta_device(name):
    from torchtune import config

    cfg = OmegaConf.load(CONFIGS / RECIPE / f"{name}.yaml")
    cfg.model.encoder_path = None
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    assert sum(p.numel() for p in model.decoder.parameters()) == LLAMA3_8B
    assert model.tokens_per_image == 196 and model.image_token_id == 128002
    assert cfg.checkpointer.model_type == "LLAMA3" and len(cfg.checkpointer.checkpoint_files) == 4
