"""``eval`` and ``vqa_judge`` killed with SIGKILL at a random row, then re-run, write files equal
to an uninterrupted run's (ids, order, values).

Each recipe runs once uninterrupted, then once more from scratch in a chain of runs: the test
watches the output file and SIGKILLs the process as soon as it holds row k (k drawn with 5 seeds,
increasing), checks that the complete rows on disk are a prefix of the uninterrupted file, and
starts the same command again; the last run finishes. So every kill point is resumed from, by the
recipe's own resume logic, with whatever torn tail the kill left. Nothing in the recipes knows it
is being tested.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEEDS = range(5)
N_ROWS = 16


def _complete_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _n_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def runner(medtune_cli):
    """``medtune <argv>`` forked from the session's pre-imported process (the test SIGKILLs the
    child by pid; :mod:`medtune.testing.forkserver`): no 5-15 CPU-s of imports per run."""
    return medtune_cli


def _run(runner, argv: list[str], cwd: Path, watch=None, kill_at: int | None = None) -> int | None:
    """Run ``medtune <argv>``; with ``kill_at``, SIGKILL it once ``watch()`` holds that many rows.

    Returns:
        None when it was killed; else its exit status, 0 (asserted). A run given ``kill_at`` can
        finish first: its rows after ``kill_at`` and its end came between two looks at the file
        (a loaded machine can keep the test from running for that long); the caller counts the
        kills that landed.
    """
    kill_when = None if kill_at is None else (lambda: _n_lines(watch()) >= kill_at)
    proc = runner.run(*argv, cwd=cwd, kill_when=kill_when, timeout=300)
    log = proc.stdout[-1000:] + proc.stderr[-2000:]
    if kill_at is not None and proc.returncode == -signal.SIGKILL:
        return None
    assert proc.returncode == 0, log
    return 0


def _kill_chain(runner, argv: list[str], cwd: Path, watch, full: list[dict]) -> list[int]:
    """Kill at 5 increasing random rows, resuming each time; then finish. Returns the kill rows."""
    points = sorted({random.Random(seed).randrange(1, len(full)) for seed in SEEDS})
    seen = []
    for k in points:
        if _n_lines(watch()) >= k:
            continue  # an earlier run already went past this row before its kill landed
        finished = _run(runner, argv, cwd, watch, kill_at=k) == 0
        rows = _complete_rows(watch())
        assert len(rows) >= k and rows == full[: len(rows)]  # a prefix: nothing reordered
        if finished:
            break  # the kill came too late: later rows are past too (len(seen) is asserted)
        seen.append(len(rows))
    _run(runner, argv, cwd)
    return seen


@pytest.fixture(scope="module")
def demo_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A checkpoint folder of the demo model, as vision_finetune/demo writes it (untrained)."""
    from medtune.testing.checkpoints import untrained_checkpoint

    config = REPO / "recipes/configs/vision_finetune/demo.yaml"
    return untrained_checkpoint(config, tmp_path_factory.mktemp("run"), assets_dir=str(tiny_assets))


def _eval_argv(assets: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        "run",
        "eval",
        "--config",
        "demo",
        f"assets_dir={assets}",
        f"checkpoints=[{ckpt}]",
        f"output_dir={out}",
        f"limit={N_ROWS}",
        "batch_size=1",  # a row on disk per generation: a kill can land at any row
    ]


def test_eval_killed_at_random_rows_resumes_to_the_uninterrupted_file(
    runner, demo_checkpoint, tiny_assets, tmp_path
):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    _run(runner, _eval_argv(tiny_assets, demo_checkpoint, ref_out), tmp_path)
    (ref_file,) = ref_out.glob("*/slake/predictions.jsonl")
    full = _complete_rows(ref_file)
    assert len(full) == N_ROWS and len({r["id"] for r in full}) == N_ROWS

    def watch() -> Path:
        found = list(out.glob("*/slake/predictions.jsonl"))
        return found[0] if found else out / "none"

    kills = _kill_chain(
        runner, _eval_argv(tiny_assets, demo_checkpoint, out), tmp_path, watch, full
    )
    assert len(kills) >= 3, kills  # most kill points were reached mid-run
    assert _complete_rows(watch()) == full
    assert watch().read_text() == ref_file.read_text()


def _plain_llama_serve_cfg(assets: Path, tmp: Path):
    cfg = OmegaConf.load(REPO / "recipes/configs/serve/default.yaml")
    cfg.llm = {
        "tokenizer": {
            "_component_": "medtune.models.llama3.llama3_tokenizer",
            "path": f"{assets}/llama3_tiny/original/tokenizer.model",
            "special_tokens_path": f"{assets}/llama3_tiny/tokenizer.json",
        },
        "model": {
            "_component_": "medtune.models.llama3.llama3_from_hf_config",
            "config_path": f"{assets}/llama3_tiny/config.json",
        },
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": f"{assets}/llama3_tiny",
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(tmp / "unused"),
        },
    }
    cfg.model_name = "tiny-judge"
    cfg.device = "cpu"
    cfg.max_wait_ms = 0
    return cfg


@pytest.fixture(scope="module")
def judge_server(tiny_assets, tmp_path_factory):
    """The tiny plain Llama-3 behind medtune serve (a thread of this process), as the judge."""
    import runpy
    import socket
    import threading

    import uvicorn

    serve = runpy.run_path(str(REPO / "recipes" / "serve.py"))
    app, _, _ = serve["build_app"](
        _plain_llama_serve_cfg(tiny_assets, tmp_path_factory.mktemp("s"))
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_vqa_judge_killed_at_random_rows_resumes_to_the_uninterrupted_file(
    runner, judge_server, tmp_path
):
    rows = [
        {
            "id": i,
            "dataset": "slake",
            "split": "test",
            "image": f"img{i}.png",
            "question": f"Is there a lesion in organ {i}?",
            "answer": "yes" if i % 2 else "no",
            "answer_type": "CLOSED",
            "prediction": "yes" if i % 3 else "no",
            "checkpoint": "ck1",
            "generation": {"max_new_tokens": 8},
        }
        for i in range(N_ROWS)
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def argv(out: Path) -> list[str]:
        return [
            "run",
            "vqa_judge",
            "--config",
            "openai_compatible",
            f"predictions=[{preds}]",
            f"output_dir={out}",
            f"judge.base_url={judge_server}/v1",
            "judge.model=tiny-judge",
            "judge.max_tokens=8",
            "judge.concurrency=1",
            "batch_size=1",  # verdicts are written after each batch: one row at a time
            "retry_unparsed=0",
        ]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    _run(runner, argv(ref), tmp_path)
    full = _complete_rows(ref / "verdicts.jsonl")
    assert [v["id"] for v in full] == list(range(N_ROWS))
    kills = _kill_chain(runner, argv(out), tmp_path, lambda: out / "verdicts.jsonl", full)
    assert len(kills) >= 3, kills
    assert _complete_rows(out / "verdicts.jsonl") == full
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for s in (summary, want):  # the resolved config names each run's own output_dir
        assert s.pop("config")["output_dir"] in (str(out), str(ref))
    assert summary == want
