"""The embedded demo: vision-only tuning that provably uses the image.

    python tools/run_demo.py --assets assets/tiny        # what `make demo` runs

1. ``medtune run vision_finetune --config demo``: tiny open_clip ViT + connector trained, tiny
   frozen Llama-3 (which knows the task from text only), on a synthetic SLAKE-schema set whose
   answers depend only on the image (lesion side, upper/lower, presence, modality).
2. The same run with ``blank_images=True``: the question-only baseline.
3. Both are scored with the ``eval`` recipe, run as a user would:
   ``medtune run eval --config demo checkpoints=[<run>/epoch_k] output_dir=<out>/eval_<run>``
   (the baseline with ``blank_images=true``); accuracy is exact match after lower-casing over the
   held-out test questions in eval's ``predictions.jsonl`` (its ``metrics.json`` has the rest).

The last line printed is ``image accuracy: 0.XX | question-only baseline: 0.YY``. The image
run's last checkpoint (``outputs/demo/image/epoch_5``, ``DEMO_CHECKPOINT`` in
``medtune.testing.demo_assets``) is what ``eval``, ``generate`` and ``serve``'s ``demo`` configs read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medtune.testing.demo_assets import DEMO_CHECKPOINT, DEMO_OUTPUT
from medtune.utils.errors import UserError, run_entry
from medtune.utils.jsonl import read_jsonl


def run_side_by_side(cmds: dict[str, list[str]], out: Path, show) -> None:
    """Run ``medtune`` commands side by side, one CPU thread each (the tiny model gains nothing
    from a shared thread pool; two single-thread processes use two cores fully).

    Args:
        cmds: name -> ``medtune`` arguments; the log goes to ``out/<name>.log``.
        out: the demo's output folder.
        show: line -> whether to echo it from the log (prefixed with the name).
    """
    procs = {}
    for name, args in cmds.items():
        cmd = [sys.executable, "-m", "medtune._cli.main", *args]
        print("$ medtune " + " ".join(args) + f"    # log: {out / name}.log", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed below
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    failed = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        text = (out / f"{name}.log").read_text()
        for line in text.splitlines():
            if show(line):
                print(f"[{name}] {line}", flush=True)
        if proc.returncode:
            print(
                f"[{name}] failed (exit {proc.returncode}):\n{text[-3000:]}",
                file=sys.stderr,
                flush=True,
            )
            failed.append(name)
    if failed:
        raise UserError(f"demo: {', '.join(failed)} failed (logs in {out})")


def train_both(assets: Path, runs: dict[str, list[str]], out: Path) -> dict[str, Path]:
    """Train the runs side by side (``medtune run vision_finetune --config demo``).

    Returns:
        run name -> its last ``epoch_k`` checkpoint folder.
    """
    cmds = {
        name: [
            "run",
            "vision_finetune",
            "--config",
            "demo",
            f"assets_dir={assets}",
            f"output_dir={out / name}",
            "log_every_n_steps=2",  # points enough for the curves (outputs/demo/plots)
            *extra,
        ]
        for name, extra in runs.items()
    }
    run_side_by_side(cmds, out, lambda line: line.startswith("epoch ") and " done:" in line)
    return {
        name: max((out / name).glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
        for name in runs
    }


def eval_both(assets: Path, ckpts: dict[str, Path], split: str, out: Path) -> dict[str, Path]:
    """Score each checkpoint with the eval recipe (``medtune run eval --config demo``); the run
    trained on blank images is scored on blank images.

    Returns:
        run name -> its eval output folder.
    """
    cmds = {
        f"eval_{name}": [
            "run",
            "eval",
            "--config",
            "demo",
            f"assets_dir={assets}",
            f"checkpoints=[{ckpt}]",
            f"output_dir={out / f'eval_{name}'}",
            f"datasets.slake.split={split}",
            *(["blank_images=true"] if name == "blank" else []),
        ]
        for name, ckpt in ckpts.items()
    }
    run_side_by_side(cmds, out, lambda line: line.startswith("eval: ") and " x slake" in line)
    return {name: out / f"eval_{name}" for name in ckpts}


def accuracy(eval_dir: Path) -> float:
    """Exact match after lower-casing over the questions of eval's predictions file."""
    (pred,) = eval_dir.glob("*/slake/predictions.jsonl")
    rows = read_jsonl(pred, what="predictions")
    right = sum(
        str(r["prediction"]).strip().lower() == str(r["answer"]).strip().lower() for r in rows
    )
    return right / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--assets", default="assets/tiny", type=Path)
    p.add_argument("--out", default=DEMO_OUTPUT, type=Path)
    p.add_argument("--split", default="test")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    ckpts = train_both(args.assets, {"image": [], "blank": ["blank_images=True"]}, args.out)
    expected = args.out / DEMO_CHECKPOINT.relative_to(DEMO_OUTPUT)
    if ckpts["image"] != expected:
        # the eval / generate / serve demo configs read DEMO_CHECKPOINT: keep them in step
        raise UserError(
            f"demo: the image run's last checkpoint is {ckpts['image']}, but the demo configs "
            f"read {expected} (update DEMO_CHECKPOINT in medtune/testing/demo_assets.py)"
        )
    evals = eval_both(args.assets, ckpts, args.split, args.out)
    acc_img = accuracy(evals["image"])
    acc_blank = accuracy(evals["blank"])
    print(
        f"demo finished in {time.perf_counter() - t0:.0f}s (checkpoints in {args.out})", flush=True
    )
    # where to look: both runs' curves on shared axes, and the image run's error-analysis page
    from medtune.viz.curves import plot_runs

    plot_runs([args.out / "image", args.out / "blank"], args.out / "plots")
    print(f"training curves (image run vs blank-image baseline): {args.out / 'plots'}/", flush=True)
    for page in sorted(evals["image"].glob("*/*/report.html")):
        print(f"report page (every test question, right / wrong): {page}", flush=True)
    print(f"image accuracy: {acc_img:.2f} | question-only baseline: {acc_blank:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(run_entry("run_demo", main))
