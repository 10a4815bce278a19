"""``lora_finetune`` (one file for 1..N processes) end to end on the tiny assets.

- every tiny config runs through the CLI (``demo``, ``demo_text``, ``demo_qlora``; ``demo`` also
  on 2 ranks forked as torchrun sets them up); the old names run it as aliases;
- resume after an interruption reproduces the uninterrupted run (single device and 2 processes);
- 2 CPU processes (gloo, FSDP2, meta-device build) give the same losses and adapters as 1 process
  with the same global batch, for LoRA and DoRA (with activation checkpointing);
- the PEFT export loads with ``peft`` onto the HF ``LlamaForCausalLM`` and gives medtune's logits;
  the merged export gives the same logits as base + adapter;
- QLoRA (NF4 base) runs at width 256, on one device and on 2 FSDP2 ranks (same losses);
- the full-size configs bind and build on the meta device with Llama-3-8B's parameter count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medtune._cli.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
RECIPE = "lora_finetune"
SMALL = [
    "val_dataset=null",
    "max_steps_per_epoch=2",
    "lr_scheduler.num_warmup_steps=1",
    "log_every_n_steps=1",
]
LLAMA3_8B = 8_030_261_248
LORA_8B_R8_ALL = 20_971_520  # rank 8 on q/k/v/o + w1/w2/w3 of 32 layers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run_recipe(
    recipe: str,
    config: str,
    *overrides: str,
    nproc: int = 0,
    cwd: Path | None = None,
    cli=None,
) -> str:
    """``medtune run`` in this process, or with ``nproc`` ranks forked from the pre-imported
    ``medtune_cli`` server (``cli``), set up as torchrun's standalone launch sets them up.

    Returns:
        The ranks' output ('' in-process).
    """
    if not nproc:
        with pytest.raises(SystemExit) as e:
            main(["run", recipe, "--config", config, *overrides])
        assert e.value.code in (0, None)
        return ""
    proc = cli.run("run", recipe, "--config", config, *overrides, nproc=nproc, cwd=cwd or ".")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def losses(out: Path) -> list[float]:
    return torch.load(out / "recipe_state.pt", weights_only=True)["loss_history"]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory) -> Path:
    """Single-device LoRA demo, 2 epochs x 2 steps, global batch 8 (the reference run)."""
    out = tmp_path_factory.mktemp("lora_ref")
    run_recipe(
        RECIPE,
        "demo",
        f"assets_dir={tiny_assets}",
        f"output_dir={out}",
        "epochs=2",
        "batch_size=8",
        *SMALL,
    )
    return out


def test_single_device_exports(uninterrupted, capsys):
    """The reference run writes every export (resume after a kill: tests/recipes/test_resume.py)."""
    for sub in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "config.yaml",
        "model.safetensors",
    ):
        assert (uninterrupted / "epoch_1" / sub).is_file(), sub


def test_two_processes_equal_one(tiny_assets, tmp_path, uninterrupted, medtune_cli):
    """2 ranks x batch 4 (FSDP2, gloo) == 1 process x batch 8: every loss and every weight."""
    common = [f"assets_dir={tiny_assets}", f"output_dir={tmp_path}", "batch_size=4", *SMALL]
    log = run_recipe(RECIPE, "demo", *common, "epochs=2", nproc=2, cli=medtune_cli)
    assert "2 process(es)" in log and "memory estimate per rank (2 rank(s)" in log
    assert losses(tmp_path) == pytest.approx(losses(uninterrupted), abs=1e-5)
    assert_same_weights(tmp_path / "epoch_1", uninterrupted / "epoch_1")


def test_dora_two_processes_equal_one(tiny_assets, tmp_path, medtune_cli):
    common = [
        f"assets_dir={tiny_assets}",
        "epochs=1",
        "model.use_dora=True",
        "enable_activation_checkpointing=True",
        *SMALL,
    ]
    run_recipe(RECIPE, "demo", *common, f"output_dir={tmp_path / 'one'}", "batch_size=8")
    run_recipe(
        RECIPE,
        "demo",
        *common,
        f"output_dir={tmp_path / 'two'}",
        "batch_size=4",
        nproc=2,
        cli=medtune_cli,
    )
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_same_weights(tmp_path / "two" / "epoch_0", tmp_path / "one" / "epoch_0")
    assert any(
        k.endswith("magnitude")
        for k in load_file(str(tmp_path / "one" / "epoch_0" / "model.safetensors"))
    )
    assert json.loads(
        (tmp_path / "one" / "epoch_0" / "adapter" / "adapter_config.json").read_text()
    )["use_dora"]


def _medtune_logits(assets: Path, ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The trained LoRA decoder (base from the assets, adapters from the checkpoint) -> [1, s, vocab]."""
    from torchtune.training import FullModelHFCheckpointer

    from medtune.models.lora import lora_llama3_from_hf_config

    cfg = OmegaConf.load(ckpt / "config.yaml").model
    dec = lora_llama3_from_hf_config(
        assets / "llama3_tiny" / "config.json",
        list(cfg.lora_attn_modules),
        cfg.apply_lora_to_mlp,
        cfg.apply_lora_to_output,
        cfg.lora_rank,
        cfg.lora_alpha,
    )
    base = FullModelHFCheckpointer(
        str(assets / "llama3_tiny"), ["model.safetensors"], "LLAMA3", str(ckpt / "tmp")
    ).load_checkpoint()["model"]
    dec.load_state_dict(base, strict=False)
    adapters = {
        k.removeprefix("decoder."): v
        for k, v in load_file(str(ckpt / "model.safetensors")).items()
        if k.startswith("decoder.")
    }
    missing, unexpected = dec.load_state_dict(adapters, strict=False)
    assert not unexpected and all(k in base for k in missing)
    dec.eval()
    with torch.no_grad():
        return dec(tokens)


# README's snippet, verbatim but for the two paths: it must run in medtune's own venv as a user runs it
README_PEFT = """
from peft import PeftModel
from transformers import LlamaForCausalLM

base = LlamaForCausalLM.from_pretrained("BASE")
model = PeftModel.from_pretrained(base, "ADAPTER")
"""


def test_peft_and_merged_exports_give_medtune_logits(tiny_assets, uninterrupted, tmp_path):

    from transformers import LlamaForCausalLM

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert README_PEFT.strip() in readme.replace(
        "/models/Meta-Llama-3-8B-Instruct", "BASE"
    ).replace("outputs/lora_finetune_slake_single_device/epoch_0/adapter", "ADAPTER"), (
        "README's PEFT snippet changed: update README_PEFT"
    )
    ckpt = uninterrupted / "epoch_1"
    tokens = torch.randint(0, 300, (1, 12))
    ours = _medtune_logits(tiny_assets, ckpt, tokens)
    base = LlamaForCausalLM.from_pretrained(
        str(tiny_assets / "llama3_tiny"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        plain = base(tokens).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapters changed something
    # a fresh interpreter of this venv, nothing of medtune imported: the snippet as README gives it
    torch.save(tokens, tmp_path / "tokens.pt")
    script = README_PEFT.replace("BASE", str(tiny_assets / "llama3_tiny")).replace(
        "ADAPTER", str(ckpt / "adapter")
    ) + (
        "import torch\n"
        f"tokens = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model.float().eval()(tokens).logits, {str(tmp_path / 'peft.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "peft.pt"), ours, atol=1e-4, rtol=1e-4)
    merged = LlamaForCausalLM.from_pretrained(
        str(ckpt / "merged"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, ours, atol=1e-4, rtol=1e-4)


def test_lora_checkpoint_loads_for_generate_and_eval(tiny_assets, uninterrupted):
    """``load_from_checkpoint`` (used by generate/eval) rebuilds base + adapters: same logits."""
    from medtune.training.loading import load_from_checkpoint

    ckpt = uninterrupted / "epoch_1"
    tokens = torch.randint(0, 300, (1, 12))
    model, _, _ = load_from_checkpoint(
        ckpt, overrides={"checkpointer.output_dir": str(ckpt / "tmp")}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.decoder(tokens), _medtune_logits(tiny_assets, ckpt, tokens), atol=1e-5, rtol=1e-5
        )


def test_qlora_width_256_single_and_two_processes(tiny_assets, tmp_path, capsys, medtune_cli):
    """QLoRA (NF4 base through torchao) at width 256 on one device and on 2 FSDP2 ranks (gloo)."""
    common = [f"assets_dir={tiny_assets}", "epochs=1", *SMALL]
    run_recipe(RECIPE, "demo_qlora", *common, f"output_dir={tmp_path / 'one'}", "batch_size=8")
    assert (
        "nf4" in capsys.readouterr().out
    )  # NF4 weights counted at their storage size in the estimate
    hist = losses(tmp_path / "one")
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(hist)))
    merged = load_file(
        str(tmp_path / "one" / "epoch_0" / "merged" / "model.safetensors")
    )  # NF4 dequantized
    assert merged["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)
    log = run_recipe(
        RECIPE,
        "demo_qlora",
        *common,
        f"output_dir={tmp_path / 'two'}",
        "batch_size=4",
        nproc=2,
        cli=medtune_cli,
    )
    assert "nf4" in log
    assert losses(tmp_path / "two") == pytest.approx(hist, abs=1e-5)
    assert_same_weights(tmp_path / "two" / "epoch_0", tmp_path / "one" / "epoch_0")


def test_one_process_wraps_nothing_and_qlora_stays_nf4(tiny_assets, tmp_path):
    """One process: no process group, no FSDP (no DTensor anywhere), the QLoRA base stays NF4 on
    the device: the single-device path and memory, in the same file that shards under torchrun."""
    import runpy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mod = runpy.run_path(str(REPO / "recipes" / f"{RECIPE}.py"), run_name="recipe")
    cfg = OmegaConf.load(CONFIGS / RECIPE / "demo_qlora.yaml")
    cfg.assets_dir, cfg.output_dir = str(tiny_assets), str(tmp_path)
    recipe = mod["LoRAFinetuneRecipe"](cfg)
    recipe.setup()
    params = list(recipe.run.model.parameters())
    assert not dist.is_initialized() and not recipe.run.distributed
    assert not any(isinstance(p, DTensor) for p in params)
    from medtune.models.lora import lora_modules

    n_lora = len(lora_modules(recipe.run.model.decoder))  # every LoRA-wrapped base weight is NF4
    assert n_lora > 0 and sum(type(p).__name__ == "NF4Tensor" for p in params) == n_lora
    recipe.cleanup()


def test_text_only_lora_sft(tiny_assets, tmp_path, capsys):
    """Text-only samples train a bare LoRA Llama-3 (``demo_text``) and a MedVLM alike."""
    run_recipe(
        RECIPE,
        "demo_text",
        f"assets_dir={tiny_assets}",
        f"output_dir={tmp_path / 'llm'}",
        "epochs=1",
        "batch_size=8",
        *SMALL,
    )
    assert "llm    lora" in capsys.readouterr().out
    assert (tmp_path / "llm" / "epoch_0" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(losses(tmp_path / "llm")) == 2
    cfg = OmegaConf.load(CONFIGS / RECIPE / "demo.yaml")  # the MedVLM, fed the image-less samples
    cfg.dataset = OmegaConf.load(CONFIGS / RECIPE / "demo_text.yaml").dataset
    OmegaConf.save(cfg, tmp_path / "vlm_text.yaml")
    run_recipe(
        RECIPE,
        str(tmp_path / "vlm_text.yaml"),
        f"assets_dir={tiny_assets}",
        f"output_dir={tmp_path / 'vlm'}",
        "epochs=1",
        "batch_size=8",
        *SMALL,
    )
    assert len(losses(tmp_path / "vlm")) == 2


@pytest.mark.parametrize(
    ("config", "override", "fragment"),
    [
        ("demo", "trainable.llm=full", "trainable.llm=full is not supported by this recipe"),
        (
            "full_finetune/demo",
            "trainable.llm=lora",
            "the LoRA recipes need a LoRA decoder",
        ),
        ("demo", "+bogus=1", "config key(s) not known to lora_finetune: bogus"),
    ],
)
def test_bad_input_is_one_line_error(tiny_assets, tmp_path, capsys, config, override, fragment):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "run",
                RECIPE,
                "--config",
                config,
                f"assets_dir={tiny_assets}",
                f"output_dir={tmp_path}",
                override,
            ]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"{RECIPE}: error:" in err and fragment in err and "Traceback" not in err


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
    assert cfg.trainable.llm == "lora"
    assert collect_problems(OmegaConf.to_container(cfg, resolve=True)) == []


@pytest.mark.parametrize(
    "name", ["slake", "vqa_rad", "slake_single_device", "vqa_rad_single_device"]
)
def test_full_size_lora_model_on_meta_device(name):
    from torchtune import config

    from medtune.models.lora import lora_modules

    cfg = OmegaConf.load(CONFIGS / RECIPE / f"{name}.yaml")
    cfg.model.encoder_path = None
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    n_lora = sum(p.numel() for n, p in model.decoder.named_parameters() if "lora_" in n)
    assert n_lora == LORA_8B_R8_ALL
    assert sum(p.numel() for p in model.decoder.parameters()) - n_lora == LLAMA3_8B
    assert len(lora_modules(model.decoder)) == 32 * 7
    assert model.tokens_per_image == 196 and model.image_token_id == 128002
