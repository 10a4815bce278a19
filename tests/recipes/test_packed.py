"""``packed: true`` and ``group_by_length: true`` through the recipes: 2 ranks equal 1 process.

(Packed loss and gradients equal the unpacked batch's: tests/data/test_packing.py; resume with
packing: tests/recipes/test_resume.py.)
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _run(cli, *args: str, nproc: int = 1) -> str:
    """``medtune run args`` forked from the pre-imported ``medtune_cli`` server (``nproc`` ranks
    as torchrun's standalone launch sets them up)."""
    proc = cli.run("run", *args, nproc=nproc, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "batching",
    [["+packed=true", "+max_seq_len=256"], ["+group_by_length=true"]],
    ids=["packed", "grouped"],
)
def test_two_ranks_equal_one_process(tiny_assets, tmp_path, batching, medtune_cli):
    common = [
        "vision_finetune",
        "--config",
        "vision_finetune/demo",
        f"assets_dir={tiny_assets}",
        "epochs=1",
        "max_steps_per_epoch=3",
        "val_dataset=null",
        "log_every_n_steps=1",
        *batching,
    ]
    _run(medtune_cli, *common, "batch_size=4", f"output_dir={tmp_path / 'one'}")
    log = _run(medtune_cli, *common, "batch_size=2", f"output_dir={tmp_path / 'two'}", nproc=2)
    assert "2 process(es)" in log
    one = torch.load(tmp_path / "one" / "recipe_state.pt", weights_only=True)["loss_history"]
    two = torch.load(tmp_path / "two" / "recipe_state.pt", weights_only=True)["loss_history"]
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-5, abs=1e-6)
    a = load_file(str(tmp_path / "one" / "epoch_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "epoch_0" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
