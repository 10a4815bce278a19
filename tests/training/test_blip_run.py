"""``medtune.training.blip_run``: the BLIP recipes' settings and per-step rules (their set-up,
checkpoints and resume run end to end in tests/recipes/test_blip_recipes.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medtune.training.blip_run import (
    BLIP_KEYS,
    alpha_at,
    save_mid_epoch,
    start_blip_run,
    step_generator,
)
from medtune.utils.errors import ConfigError


def _run(tmp_path, **extra):
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "batch_size": 2, "epochs": 3,
                            "device": "cpu", **extra})  # fmt: skip
    return start_blip_run(cfg, "blip_pretrain", BLIP_KEYS, max_length=30, alpha_warmup_epochs=2)


def test_defaults_are_blips_and_an_unknown_key_is_named(tmp_path):
    run = _run(tmp_path)
    assert (run.max_length, run.max_words, run.alpha, run.alpha_warmup) == (30, 30, 0.4, 2.0)
    assert (run.rank, run.world_size, run.is_rank_zero) == (0, 1, True)
    with pytest.raises(ConfigError, match="alpah"):
        _run(tmp_path, alpah=0.4)


def test_alpha_ramps_as_blip_and_mid_epoch_checkpoints_skip_the_epoch_end(tmp_path):
    run = _run(tmp_path, save_every_n_steps=5)
    run.n_batches = 10
    # pretrain.py: alpha * min(1, (epoch * n + i) / (2 * n))
    assert [alpha_at(run, e, i) for e, i in ((0, 0), (0, 5), (1, 0), (1, 5), (2, 0))] == (
        pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    )
    run.alpha_warmup = 0
    assert alpha_at(run, 0, 0) == 0.4
    run.global_step, run.batches_done = 5, 5
    assert save_mid_epoch(run)
    run.global_step, run.batches_done = 10, 10  # the epoch's last step: the epoch checkpoint
    assert not save_mid_epoch(run)
    run.global_step, run.batches_done = 16, 6
    assert not save_mid_epoch(run)


def test_step_generator_depends_on_seed_and_step_only():
    import torch

    a = torch.rand(4, generator=step_generator(3, 7))
    assert torch.equal(a, torch.rand(4, generator=step_generator(3, 7)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(3, 8)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(4, 7)))
