"""``medtune run generate``: one image + question from the command line, and a JSONL file of prompts."""

from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main
from medtune.testing.datasets import make_medical_image

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "generate.py"
CONFIGS = REPO / "recipes" / "configs" / "generate"

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> tuple[int, str]:
    """``medtune <argv>`` in this process; returns (status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            status = main(list(argv))
        except SystemExit as e:  # torchtune's config.parse exits with the recipe's status
            status = e.code
    return int(status or 0), buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A tiny vision_finetune checkpoint (2 steps)."""
    assets = tiny_assets if isinstance(tiny_assets, Path) else Path(tiny_assets.root)
    out = tmp_path_factory.mktemp("run")
    status, stdout = _cli(
        "run",
        "vision_finetune",
        "--config",
        "demo",
        f"assets_dir={assets}",
        f"output_dir={out}",
        "epochs=1",
        "max_steps_per_epoch=2",
        "batch_size=8",
        "log_every_n_steps=100",
    )
    assert status == 0, stdout[-2000:]
    return out / "epoch_0"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_medical_image(1, modality="CT", lesion="left").save(root / "ct.png")
    make_medical_image(2, modality="MRI", lesion="right").save(root / "mri.png")
    return root


def _generate(checkpoint: Path, *overrides: str) -> tuple[int, str]:
    return _cli(
        "run",
        "generate",
        "--config",
        "default",
        f"checkpoint={checkpoint}",
        "device=cpu",
        "max_new_tokens=6",
        *overrides,
    )


def test_generate_one_question_from_the_command_line(checkpoint, images, tmp_path):
    status, stdout = _generate(
        checkpoint, f"image={images / 'ct.png'}", "question=Which side is the lesion on?"
    )
    assert status == 0, stdout[-2000:]
    answer = stdout.rstrip("\n").splitlines()[-1]
    assert answer and not answer.startswith("generate:")
    # the same question through a prompts file (batched with others) gives the same greedy answer
    prompts = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "image": "ct.png", "question": "Which side is the lesion on?"},
        {"image": ["mri.png"], "question": "What modality is shown?", "source": "x"},
        {"id": "c", "image": str(images / "mri.png"), "question": "Is there a lesion?"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    status, stdout = _generate(
        checkpoint, f"prompts={prompts}", f"image_root={images}", f"output={out}", "batch_size=2"
    )
    assert status == 0, stdout[-2000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == ["a", 2, "c"]  # default id: the line number
    assert got[0]["prediction"] == answer
    assert got[1]["source"] == "x" and got[1]["image"] == ["mri.png"]
    for r in got:
        assert isinstance(r["prediction"], str)
        assert r["checkpoint"] == str(checkpoint)
        assert r["generation"]["max_new_tokens"] == 6 and r["generation"]["temperature"] == 0.0


def test_sampling_is_seeded(checkpoint, images):
    args = [
        f"image={images / 'mri.png'}",
        "question=What modality is shown?",
        "temperature=1.5",
        "top_k=50",
        "top_p=0.95",
        "max_new_tokens=12",
    ]
    a = _generate(checkpoint, *args, "seed=7")
    b = _generate(checkpoint, *args, "seed=7")
    assert a[0] == b[0] == 0
    assert a[1].splitlines()[-1] == b[1].splitlines()[-1]


def test_generate_errors_are_clear(checkpoint, images, capsys):
    status, _ = _generate(checkpoint)
    assert status == 1 and "question=" in capsys.readouterr().err
    status, _ = _generate(checkpoint, f"image={images / 'missing.png'}", "question=What?")
    assert status == 1 and "image not found" in capsys.readouterr().err


def _known_keys() -> set[str]:
    tree = ast.parse(RECIPE.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KNOWN_KEYS":
            return set(ast.literal_eval(node.value))
    raise AssertionError("KNOWN_KEYS not found")


@pytest.mark.parametrize("name", ["default", "demo"])
def test_generate_configs_are_valid(name):
    from medtune._cli.validate import collect_problems

    assert f"medtune run generate --config {name}" in (CONFIGS / f"{name}.yaml").read_text()
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert next(iter(cfg.keys())) == "output_dir"
    assert set(cfg.keys()) <= _known_keys(), set(cfg.keys()) - _known_keys()
    assert collect_problems(OmegaConf.to_container(cfg, resolve=True)) == []


def test_prompts_file_resumes_after_a_killed_run(checkpoint, images, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    rows = [
        {"id": i, "image": "ct.png" if i % 2 else "mri.png", "question": q}
        for i, q in enumerate(
            ["Which side is the lesion on?", "What modality is shown?", "Is there a lesion?"]
        )
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = (f"prompts={prompts}", f"image_root={images}", f"output={out}", "batch_size=2")
    assert _generate(checkpoint, *args)[0] == 0
    full = out.read_text().splitlines()
    # a killed run: two rows written, the third half-written
    out.write_text(full[0] + "\n" + full[1] + "\n" + full[2][:20])
    capsys.readouterr()
    status, stdout = _generate(checkpoint, *args)
    assert status == 0, stdout[-2000:]
    assert "1 answers" in stdout and "2 kept from an earlier run" in stdout
    assert out.read_text().splitlines() == full  # nothing lost, nothing duplicated
    # other settings would mix answers: refused, unless overwrite=true
    status, stdout = _generate(checkpoint, *args, "max_new_tokens=3")
    err = capsys.readouterr().err
    assert status == 1 and "other generation settings" in err and "overwrite=true" in err
    assert _generate(checkpoint, *args, "max_new_tokens=3", "overwrite=true")[0] == 0
    assert all(
        json.loads(r)["generation"]["max_new_tokens"] == 3 for r in out.read_text().splitlines()
    )
