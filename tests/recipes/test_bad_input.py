"""Bad input to a training recipe, tried as a new user would: each class of mistake gives one
``vision_finetune: error: ...`` line naming the file, row or key, a non-zero exit, no traceback,
and no half-written checkpoint. (Library-level translation: tests/utils/test_errors.py.)

The recipe runs in this process through the CLI (``main(["run", ...])``: the script is executed as
``__main__`` under ``run_entry``, as from a shell), except Ctrl-C, which needs a real process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from medtune._cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[2]
SMALL = ["epochs=1", "max_steps_per_epoch=1", "batch_size=4", "val_dataset=null"]


def _fails(capsys, *args: str, config: str = "vision_finetune/demo") -> str:
    """Run vision_finetune in-process; it must exit non-zero with one error line."""
    with pytest.raises(SystemExit) as e:
        main(["run", "vision_finetune", "--config", config, *args])
    err = capsys.readouterr().err
    assert e.value.code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _common(tiny_assets, out: Path) -> list[str]:
    return [f"assets_dir={tiny_assets}", f"output_dir={out}", *SMALL]


def test_yaml_parse_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text(
        (REPO / "recipes/configs/vision_finetune/demo.yaml").read_text() + "\nlr: [1, 2\n"
    )
    # refused by `medtune run` before the recipe starts: one line with the file and the line
    status = main(["run", "vision_finetune", "--config", str(bad)])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"{bad}: line " in lines[0], err


def test_missing_mandatory_value_names_the_key(tiny_assets, tmp_path, capsys):
    text = (REPO / "recipes/configs/vision_finetune/demo.yaml").read_text()
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        text.replace(
            "root: ${assets_dir}/tiny_slake/Slake1.0\n  split: train",
            "root: ???\n  split: train",
            1,
        )
    )
    assert "???" in cfg.read_text()
    line = _fails(capsys, *_common(tiny_assets, tmp_path / "o"), config=str(cfg))
    assert "dataset.root" in line


def test_component_that_does_not_import(tiny_assets, tmp_path, capsys):
    line = _fails(
        capsys, *_common(tiny_assets, tmp_path / "o"), "optimizer._component_=torch.optim.AdamWW"
    )
    assert "optimizer" in line and "AdamWW" in line


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("batch_size=abc", "batch_size"),
        ("epochs=1.5", "epochs"),
        ("lr.connector=-1e-3", "lr.connector"),
    ],
)
def test_ill_typed_or_negative_value_names_the_key(tiny_assets, tmp_path, capsys, override, key):
    line = _fails(capsys, *_common(tiny_assets, tmp_path / "o"), override)
    assert line.split("error: ", 1)[1].startswith(key), line
    assert not (tmp_path / "o" / "epoch_0").exists()


def test_truncated_llm_checkpoint(tiny_assets, tmp_path, capsys):
    llm = tmp_path / "llm"
    llm.mkdir()
    for f in (tiny_assets / "llama3_tiny").iterdir():
        if f.is_file():
            (llm / f.name).write_bytes(f.read_bytes())
    data = (llm / "model.safetensors").read_bytes()
    (llm / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _fails(
        capsys, *_common(tiny_assets, tmp_path / "o"), f"checkpointer.checkpoint_dir={llm}"
    )
    assert "model.safetensors" in line


def test_llm_checkpoint_of_another_width(tiny_assets, tmp_path, capsys):
    line = _fails(
        capsys,
        *_common(tiny_assets, tmp_path / "o"),
        f"checkpointer.checkpoint_dir={tiny_assets / 'llama3_tiny256'}",
    )
    # the width in words, naming the folder (not torch's size-mismatch list)
    assert f"LLM checkpoint {tiny_assets / 'llama3_tiny256'} has width 256" in line, line
    assert "the model expects 64" in line, line


def test_pickle_where_the_recipe_state_should_be(tiny_assets, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    import pickle

    (out / "recipe_state.pt").write_bytes(pickle.dumps({"epoch": 0, "evil": print}))
    line = _fails(capsys, *_common(tiny_assets, out), "resume_from_checkpoint=True")
    assert "recipe_state.pt" in line


def _slake_copy(tiny_assets: Path, dst: Path, rows_fn) -> Path:
    import shutil

    src = tiny_assets / "tiny_slake" / "Slake1.0"
    shutil.copytree(src, dst)
    for split in ("train", "validation", "test"):
        rows = json.loads((dst / f"{split}.json").read_text())
        (dst / f"{split}.json").write_text(json.dumps(rows_fn(split, rows)))
    return dst


def test_missing_image_inside_a_dataloader_worker(tiny_assets, tmp_path, capsys):
    """The worker's wrapped exception is unwrapped to the reader's one line (no worker traceback)."""
    root = _slake_copy(tiny_assets, tmp_path / "Slake1.0", lambda split, rows: rows)
    rows = json.loads((root / "train.json").read_text())
    (root / "imgs" / rows[0]["img_name"]).unlink()
    line = _fails(
        capsys,
        *_common(tiny_assets, tmp_path / "o"),
        f"dataset.root={root}",
        "num_workers=2",
        "shuffle=false",
    )
    assert rows[0]["img_name"] in line and "DataLoader worker" not in line


def test_training_conversation_without_an_assistant_turn(tiny_assets, tmp_path, capsys):
    rows = [
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq?"}]}
    ]
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    (tmp_path / "conv.json").write_text(json.dumps(rows))
    line = _fails(
        capsys,
        *_common(tiny_assets, tmp_path / "o"),
        "dataset._component_=medtune.data.sharegpt",
        "~dataset.root",
        "~dataset.split",
        f"+dataset.path={tmp_path / 'conv.json'}",
        f"+dataset.image_root={tmp_path}",
    )
    assert "assistant" in line


def test_ctrl_c_is_one_line_and_status_130(tiny_assets, tmp_path, medtune_cli):
    """SIGINT while training: ``vision_finetune: interrupted``, exit 130, no traceback.

    The run is a real process, forked from the fork server (which starts as a fresh ``medtune``
    process would, default SIGINT handling included, minus the imports); a real SIGINT is sent to
    it once training is under way."""
    log = tmp_path / "o" / "logs"
    state = {"seen": None, "sent": []}

    def interrupt() -> bool:
        if not state["sent"] and log.is_dir() and any(log.iterdir()):
            # the metric logger exists once training is set up; then 2 s into training
            state["seen"] = state["seen"] or time.monotonic()
            if time.monotonic() - state["seen"] > 2:
                state["sent"] = list(medtune_cli.running)
                for pid in state["sent"]:
                    os.kill(pid, signal.SIGINT)
        return False  # never SIGKILL: the run must end on its own

    proc = medtune_cli.run(
        "run", "vision_finetune", "--config", "vision_finetune/demo", f"assets_dir={tiny_assets}",
        f"output_dir={tmp_path / 'o'}", "epochs=50", "val_dataset=null",
        cwd=os.getcwd(), timeout=300, kill_when=interrupt,
    )  # fmt: skip
    err = proc.stderr
    assert len(state["sent"]) == 1, state  # one process, interrupted during training
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "vision_finetune: interrupted" in err, err[-3000:]
