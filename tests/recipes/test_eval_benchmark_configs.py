"""The benchmark eval configs (issue 22) validate, and both forms of ``checkpoints`` (a list of
paths, a mapping with ``model: hf | openai`` entries) override their ``null`` default as
command-line overrides are merged (OmegaConf refuses to merge a mapping into a list)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "eval"
NAMES = (
    "pathvqa",
    "pmc_vqa",
    "omnimedvqa",
    "medxpertqa_mm",
    "mmmu_med",
    "med_vqa_suite",
    "demo_backends",
)


@pytest.mark.parametrize("name", NAMES)
def test_config_validates(name, capsys):
    assert main(["validate", f"eval/{name}"]) == 0, capsys.readouterr().err
    if name == "demo_backends":
        return
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for override, want in (
        ("checkpoints=[runs/a/epoch_0]", ["runs/a/epoch_0"]),
        (
            "checkpoints={t: runs/a, b: {model: hf, path: /m}}",
            {"t": "runs/a", "b": {"model": "hf", "path": "/m"}},
        ),
    ):
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        assert OmegaConf.to_container(merged.checkpoints) == want
