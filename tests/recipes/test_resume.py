"""Resume is exact: a run killed mid-epoch and resumed equals the uninterrupted run, bit for bit.

Each case runs a recipe through the CLI (``medtune._cli.main``, forked from one pre-imported process:
the ``medtune_cli`` fixture) three times on the tiny assets:

1. uninterrupted (reference);
2. the same config, killed with SIGKILL at the start of optimizer step K (no cleanup, no atexit;
   the latest state is the ``step_{K-1}`` save, in the middle of an epoch);
3. ``resume_from_checkpoint=True`` over the killed run's folder.

Every logged loss and every tensor of every saved file of the last checkpoint must be equal
(``==`` / ``torch.equal``), with training randomness switched on: image augmentation, LoRA dropout,
shuffling, a list of sampled prompt templates and DataLoader workers, on 1 and 2 processes. Three
steps per epoch with warm-up make the learning-rate schedule matter (two steps per epoch hid a
schedule bug before).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.testing.forkserver import write_kill_wrapper

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KILL_AT = 5  # killed before the 5th update: the last save is step_4, one batch into epoch 1

TEMPLATES = "prompt_template=['{question}', 'Question: {question}', '{question} Answer briefly.']"

CASES = {
    "vision_1proc_augment_templates_workers": (
        "vision_finetune",
        1,
        ["+augment.hflip=0.5", "+augment.rotation=10", TEMPLATES, "num_workers=2"],
    ),
    "lora_1proc_dropout_augment": (
        "lora_finetune",
        1,
        ["model.lora_dropout=0.1", "+augment.hflip=0.5"],
    ),
    "lora_2proc_dropout": (
        "lora_finetune",
        2,
        ["model.lora_dropout=0.1", "+augment.hflip=0.5", "num_workers=1"],
    ),
    "full_1proc": ("full_finetune", 1, [TEMPLATES]),
    "vision_1proc_packed": (
        "vision_finetune",
        1,
        ["+packed=true", "+max_seq_len=256", "+augment.hflip=0.5", TEMPLATES],
    ),
}


def _run(cli, recipe: str, nproc: int, args: list[str], env: dict | None = None):
    """``medtune run [--nproc_per_node N] RECIPE args`` in a forked pre-imported process (the
    ranks as torchrun's standalone launch sets them up; see :mod:`medtune.testing.forkserver`)."""
    return cli.run("run", recipe, *args, cwd=REPO, env=env, nproc=nproc, timeout=600)


def _files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(f.relative_to(folder)): load_file(str(f)) for f in sorted(folder.rglob("*.safetensors"))
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_and_resumed_equals_uninterrupted(tiny_assets, tmp_path, case, medtune_cli):
    recipe, nproc, extra = CASES[case]
    batch = 8 // nproc  # the same global batch on 1 and 2 processes
    common = [
        "--config",
        f"{recipe}/demo",
        f"assets_dir={tiny_assets}",
        "epochs=2",
        "max_steps_per_epoch=3",
        f"batch_size={batch}",
        "save_every_n_steps=2",
        "lr_scheduler.num_warmup_steps=2",
        "log_every_n_steps=1",
        "val_dataset=null",
        "shuffle=true",
        *extra,
    ]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _run(medtune_cli, recipe, nproc, [*common, f"output_dir={ref}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    wrapper = write_kill_wrapper(REPO / "recipes" / f"{recipe}.py", tmp_path)
    env = {"MEDTUNE_TEST_KILL_AT_STEP": str(KILL_AT)}
    proc = _run(medtune_cli, str(wrapper), nproc, [*common, f"output_dir={killed}"], env)
    assert proc.returncode != 0, "the run was not killed"
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(killed / "recipe_state.pt", weights_only=True)
    assert state["checkpoint"] == f"step_{KILL_AT - 1}" and state["epoch"] == 1
    assert 0 < state["batches_done"] < 3  # mid-epoch
    assert not (killed / "epoch_1").exists()

    proc = _run(
        medtune_cli, recipe, nproc, [*common, f"output_dir={killed}", "resume_from_checkpoint=True"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout + proc.stderr

    want = torch.load(ref / "recipe_state.pt", weights_only=True)
    got = torch.load(killed / "recipe_state.pt", weights_only=True)
    assert len(want["loss_history"]) == 6
    assert got["loss_history"] == want["loss_history"]  # every logged loss, exactly
    a, b = _files(ref / "epoch_1"), _files(killed / "epoch_1")
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}:{k}"
