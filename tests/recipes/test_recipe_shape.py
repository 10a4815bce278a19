"""A recipe is its loop: ``medtune cp`` hands over a script whose loss line a user can change and
run; ``compile: true`` runs the same loop compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medtune._cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = ["epochs=1", "max_steps_per_epoch=2", "batch_size=4", "val_dataset=null", "shuffle=false"]
LOSS_LINE = "return self.run.loss_fn(logits, targets[keep]), keep.sum()"


def _run(*args: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", *args])
    assert e.value.code in (0, None)


def _losses(out: Path) -> list[float]:
    return torch.load(out / "recipe_state.pt", weights_only=True)["loss_history"]


def test_copied_recipe_with_a_changed_loss_line_runs(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "lora_finetune", "my_lora.py"]) == 0
    script = tmp_path / "my_lora.py"
    text = script.read_text()
    assert text.count(LOSS_LINE) == 1 and "def train(self)" in text  # the loop is in the file
    script.write_text(
        text.replace(LOSS_LINE, "return 2.0 * self.run.loss_fn(logits, targets[keep]), keep.sum()")
    )
    common = ["--config", "lora_finetune/demo", f"assets_dir={tiny_assets}", *SMALL]
    _run("lora_finetune", *common, f"output_dir={tmp_path / 'orig'}")
    _run(str(script), *common, f"output_dir={tmp_path / 'mine'}")
    orig, mine = _losses(tmp_path / "orig"), _losses(tmp_path / "mine")
    assert len(orig) == len(mine) == 2
    assert mine[0] == 2.0 * orig[0]  # the first step's loss, before any update: exactly doubled


def test_compile_true_gives_the_eager_losses(tiny_assets, tmp_path, monkeypatch, capsys):
    """``compile: true`` (each decoder layer and the trained encoder blocks, torch.compile) trains
    like eager. aot_eager: the same graph capture without inductor's C++ build (minutes on CI)."""
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    common = [
        "vision_finetune",
        "--config",
        "vision_finetune/demo",
        f"assets_dir={tiny_assets}",
        *SMALL,
    ]
    _run(*common, f"output_dir={tmp_path / 'eager'}")
    capsys.readouterr()
    _run(*common, "+compile=true", f"output_dir={tmp_path / 'compiled'}")
    assert "compile (aot_eager): 2 decoder layers" in capsys.readouterr().out
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 2 and compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
