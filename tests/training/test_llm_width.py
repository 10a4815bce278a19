"""An LLM checkpoint of another width is named in one line by every loader:
"LLM checkpoint <dir> has width 256, the model expects 64" (``generate`` through
``training.loading.load_from_checkpoint``; the training recipes through ``setup.load_unsharded``),
never torch's size-mismatch list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from medtune._cli.main import main
from medtune.testing.checkpoints import untrained_checkpoint
from medtune.training.setup import llm_width_problem, load_unsharded, read_llm_state
from medtune.utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wide_llm_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A checkpoint folder of the demo model (64-wide tiny Llama-3) whose config names the
    256-wide tiny Llama-3 as its LLM checkpoint (a moved / wrong ``checkpoint_dir``)."""
    return untrained_checkpoint(
        REPO / "recipes/configs/vision_finetune/demo.yaml",
        tmp_path_factory.mktemp("run"),
        assets_dir=str(tiny_assets),
        **{"checkpointer.checkpoint_dir": f"{tiny_assets}/llama3_tiny256"},
    )


def test_generate_names_the_checkpoint_and_both_widths(
    wide_llm_checkpoint, tiny_assets, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(
            [
                "run",
                "generate",
                "--config",
                "demo",
                f"assets_dir={tiny_assets}",
                f"checkpoint={wide_llm_checkpoint}",
                f"output_dir={tmp_path}",
            ]
        )
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 1, err
    lines = [line for line in err.splitlines() if " error: " in line]
    want = f"generate: error: LLM checkpoint {tiny_assets}/llama3_tiny256 has width 256, the model expects 64"
    assert lines == [want], err
    assert "Traceback" not in err and "size mismatch" not in err


def test_training_loader_names_the_checkpoint_and_both_widths(tiny_assets):
    cfg = OmegaConf.load(REPO / "recipes/configs/vision_finetune/demo.yaml")
    cfg.assets_dir = str(tiny_assets)
    cfg.checkpointer.checkpoint_dir = f"{tiny_assets}/llama3_tiny256"
    cfg.checkpointer.output_dir = "/nonexistent/never-written"
    model = config.instantiate(cfg.model)
    full = read_llm_state(cfg.checkpointer, prefix="decoder.")
    source = f"checkpointer ({cfg.checkpointer.checkpoint_dir})"
    with pytest.raises(UserError) as e:
        load_unsharded(model, full, torch.device("cpu"), source)
    assert str(e.value) == (
        f"LLM checkpoint {tiny_assets}/llama3_tiny256 has width 256, the model expects 64"
    )
    # the same widths: no problem reported
    same = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    assert llm_width_problem(model, same, "x") is None
