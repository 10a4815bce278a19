"""The sharded local judge (FSDP2 under ``medtune run --nproc_per_node 2``) on CPU with gloo.

The shipped ``llama3_70b_sharded`` config, pointed at the tiny Llama-3, is run with two processes
and in one process; the verdict rows (raw replies included) must be identical: sharding changes
where the weights live, not what the judge says. Only rank 0 writes; a second sharded run finds
every verdict cached and the followers take part in no generate call.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

torch = pytest.importorskip("torch")

from .conftest import write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes" / "configs" / "vqa_judge" / "llama3_70b_sharded.yaml"
MEDTUNE = Path(sys.executable).with_name("medtune")


def _tiny_config(tiny_assets: Path, path: Path) -> Path:
    cfg = OmegaConf.load(CONFIG)
    d = tiny_assets / "llama3_tiny"
    cfg.judge.checkpoint_dir = str(d)
    cfg.judge.checkpointer.checkpoint_files = ["model.safetensors"]
    cfg.judge.tokenizer.special_tokens_path = str(d / "tokenizer.json")
    cfg.judge.model.max_seq_len = 512
    cfg.judge.device, cfg.judge.dtype, cfg.judge.max_new_tokens = "cpu", "fp32", 4
    cfg.judge.batch_size = 3  # generate batches of 3 + 2 (left padding, early stops)
    # The tiny model was pretrained on short medical questions: asked the bare question it gives
    # varied replies of different lengths (the default judge prompt gets the same word for all).
    cfg.prompt.template = "{question}"
    OmegaConf.save(cfg, path)
    return path


def _launch(cli, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``medtune run --nproc_per_node N ...`` as ranks forked from the pre-imported server."""
    return cli.run_command([str(MEDTUNE), "run", *args], cwd=cwd, timeout=240)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_cpu_ranks_judge_like_one_process(
    tiny_assets, tmp_path, pred_rows, capsys, medtune_cli
):
    from medtune._cli.main import main

    assert MEDTUNE.exists(), MEDTUNE
    cfg = _tiny_config(tiny_assets, tmp_path / "tiny_sharded.yaml")
    questions = [
        "which organ is shown on the left side of the image?",
        "is this a ct scan?",
        "how many kidneys are there?",
        "Question: is there an abnormality?\nOur answer: yes\nCorrect answer: no",
        "where is the lesion located?",
    ]
    rows = [{**r, "question": q} for r, q in zip(pred_rows, questions)]
    preds = write_jsonl(tmp_path / "preds.jsonl", rows)
    out2, out1 = tmp_path / "two", tmp_path / "one"
    args = ["vqa_judge", "--config", str(cfg), f"predictions=[{preds}]"]

    two = _launch(medtune_cli, ["--nproc_per_node", "2", *args, f"output_dir={out2}"], cwd=tmp_path)
    log = two.stdout + two.stderr
    assert two.returncode == 0, log[-6000:]
    # rank 1 took part in every generate call of rank 0 and wrote nothing
    assert "rank 1: followed" in log and "rank 1: followed 0 " not in log, log[-3000:]
    # the decoder really is sharded: each rank holds about half of the parameters
    held = re.findall(r"rank (\d)/2 holds ([\d,]+) of ([\d,]+) judge parameters", log)
    assert sorted(r for r, _, _ in held) == ["0", "1"], log[-3000:]
    for _, local, total in held:
        assert int(local.replace(",", "")) < 0.6 * int(total.replace(",", ""))
    assert log.count("vqa_judge: wrote ") == 1  # summaries written once, by rank 0
    v2 = _lines(out2 / "verdicts.jsonl")
    assert sorted(v["id"] for v in v2) == [r["id"] for r in rows]  # one verdict per row
    assert {v["judge"] for v in v2} == {"local:llama3_70b_instruct"}
    summary = json.loads((out2 / "summary.json").read_text())
    assert (
        summary["n"] == 5 and summary["n_right"] + summary["n_wrong"] + summary["n_unparsed"] == 5
    )
    assert (out2 / "summary.md").exists()
    names = {p.name for p in out2.iterdir()} - {"checkpointer_unused"}  # the checkpointer's dir
    assert names == {"summary.json", "summary.md", "verdicts.jsonl"}  # no stray .tmp or rank files

    # The same config in one process (1 thread, as each torchrun worker): identical verdict rows.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", *args, f"output_dir={out1}"])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0, capsys.readouterr()
    v1 = _lines(out1 / "verdicts.jsonl")
    assert v2 == v1
    assert len({v["raw"] for v in v2}) >= 3  # varied generated texts, not an empty pipeline

    # Run again: every verdict is cached; the follower is released without generating.
    again = _launch(
        medtune_cli, ["--nproc_per_node", "2", *args, f"output_dir={out2}"], cwd=tmp_path
    )
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-6000:]
    assert "5 cached, 0 to judge" in log and "rank 1: followed 0 batch(es)" in log
    assert _lines(out2 / "verdicts.jsonl") == v2


@pytest.mark.slow
def test_rank0_error_releases_followers(tiny_assets, tmp_path, pred_rows, medtune_cli):
    """Rank 0 fails after the model is built (a damaged verdicts.jsonl): no rank hangs."""
    cfg = _tiny_config(tiny_assets, tmp_path / "tiny_sharded.yaml")
    preds = write_jsonl(tmp_path / "preds.jsonl", pred_rows[:2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "verdicts.jsonl").write_text("not json\n")
    run = _launch(medtune_cli, ["--nproc_per_node", "2", "vqa_judge", "--config", str(cfg),
                   f"predictions=[{preds}]", f"output_dir={out}"], cwd=tmp_path)  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-4000:]
    assert "not a verdict row" in log and "rank 1: followed 0 batch(es)" in log
    assert (out / "verdicts.jsonl").read_text() == "not json\n"
    assert not (out / "summary.json").exists()


def test_sharded_refuses_nf4(monkeypatch, tmp_path):
    from medtune.eval.judge import build_local_generate_fn

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="quantize"):
        build_local_generate_fn({"device": "cpu", "quantize": "nf4"})


def test_shipped_sharded_config():
    text = CONFIG.read_text()
    assert "medtune run --nproc_per_node 8 vqa_judge --config llama3_70b_sharded" in text
    assert "NOT WIRED" not in text
    cfg = OmegaConf.load(CONFIG)
    j = cfg.judge
    assert j._component_ == "medtune.eval.judge.build_local_judge"
    assert j.quantize is None and j.dtype == "bf16" and j.device == "cuda"
    assert j.checkpointer._component_ == "torchtune.training.FullModelHFCheckpointer"
    assert j.checkpointer.checkpoint_files.filename_format.format("00001", "00030") == (
        "model-00001-of-00030.safetensors"
    )
    assert j.checkpointer.checkpoint_files.max_filename == "00030"
    cfg.judge.checkpoint_dir = "/m"
    assert cfg.judge.model.config_path == "/m/config.json"
    assert cfg.judge.tokenizer.path == "/m/original/tokenizer.model"


def test_generate_sync_next_hook():
    """``generate(sync_next=...)`` uses the hook's tokens: a row ends when they say stop."""
    from medtune.generation import generate
    from medtune.models.llama3 import llama3_tiny

    torch.manual_seed(0)
    model = llama3_tiny(vocab_size=64, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_dim=64, max_seq_len=32).eval()  # fmt: skip
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate(model, prompts, pad_id=0, stop_tokens=[63], max_new_tokens=4)
    seen = []

    def same(nxt):
        seen.append(nxt.clone())
        return nxt

    assert (
        generate(model, prompts, pad_id=0, stop_tokens=[63], max_new_tokens=4, sync_next=same)
        == plain
    )
    assert len(seen) == 4 and all(t.shape == (2,) for t in seen)

    def stop_row0_first_step(nxt):
        nxt = nxt.clone()
        if len(seen) == 4:
            nxt[0] = 63
        seen.append(nxt)
        return nxt

    got = generate(model, prompts, pad_id=0, stop_tokens=[63], max_new_tokens=4,
                   sync_next=stop_row0_first_step)  # fmt: skip
    assert got[0] == [] and got[1] == plain[1]
