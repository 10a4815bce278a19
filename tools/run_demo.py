"""The embedded demo: vision-only tuning that provably uses the image.

    python tools/run_demo.py --assets assets/tiny        # what `make demo` runs

1. ``medtune run vision_finetune --config demo``: tiny open_clip ViT + connector trained, tiny
   frozen Llama-3 (which knows the task from text only), on a synthetic SLAKE-schema set whose
   answers depend only on the image (lesion side, upper/lower, presence, modality).
2. The same run with ``blank_images=True``: the question-only baseline.
3. Both answer the held-out test questions by greedy generation; exact match after lower-casing.

The last line printed is ``image accuracy: 0.XX | question-only baseline: 0.YY``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def train_both(assets: Path, runs: dict[str, list[str]], out: Path) -> dict[str, Path]:
    """Train the runs side by side, one CPU thread each (the tiny model gains nothing from a
    shared thread pool; two single-thread processes use two cores fully).

    Returns:
        run name -> its last ``epoch_k`` checkpoint folder.
    """
    procs = {}
    for name, extra in runs.items():
        cmd = [
            sys.executable,
            "-m",
            "medtune._cli.main",
            "run",
            "vision_finetune",
            "--config",
            "demo",
            f"assets_dir={assets}",
            f"output_dir={out / name}",
            "log_every_n_steps=1000",
            *extra,
        ]
        print("$ medtune " + " ".join(cmd[3:]) + f"    # log: {out / name}.log", flush=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed below
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    failed = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        text = (out / f"{name}.log").read_text()
        for line in text.splitlines():
            if line.startswith("epoch ") and " done:" in line:
                print(f"[{name}] {line}", flush=True)
        if proc.returncode:
            print(
                f"[{name}] failed (exit {proc.returncode}):\n{text[-3000:]}",
                file=sys.stderr,
                flush=True,
            )
            failed.append(name)
    if failed:
        sys.exit(1)
    return {
        name: max((out / name).glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
        for name in runs
    }


def accuracy(ckpt: Path, split: str, blank: bool, batch_size: int = 32) -> float:
    from medtune.data import slake
    from medtune.data.chat import VisionChatDataset
    from medtune.generation import generate
    from medtune.models.loading import load_from_checkpoint

    model, tok, cfg = load_from_checkpoint(ckpt)
    samples = slake(cfg.dataset.root, split=split)
    ds = VisionChatDataset(
        samples,
        tok,
        image_token_id=model.image_token_id,
        tokens_per_image=model.tokens_per_image,
        transforms=model.image_transforms,
        prompt_template=cfg.get("prompt_template"),
        blank_images=blank,
    )
    right = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        prompts = [
            ds.encode(ds.prepare(s, i + j), add_generation_prompt=True)[0]
            for j, s in enumerate(chunk)
        ]
        loaded = [ds.load_images(s) for s in chunk]
        images = {k: torch.cat([x[k] for x in loaded]) for k in loaded[0]}
        outs = generate(
            model,
            prompts,
            pad_id=tok.pad_id,
            stop_tokens=tok.stop_tokens,
            images=images,
            image_counts=torch.tensor([len(s.images) for s in chunk]),
            max_new_tokens=8,
        )
        right += sum(
            tok.decode(o).strip().lower() == s.meta["answer"].strip().lower()
            for o, s in zip(outs, chunk)
        )
    return right / len(samples)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--assets", default="assets/tiny", type=Path)
    p.add_argument("--out", default="outputs/demo", type=Path)
    p.add_argument("--split", default="test")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    ckpts = train_both(args.assets, {"image": [], "blank": ["blank_images=True"]}, args.out)
    acc_img = accuracy(ckpts["image"], args.split, blank=False)
    acc_blank = accuracy(ckpts["blank"], args.split, blank=True)
    print(
        f"demo finished in {time.perf_counter() - t0:.0f}s (checkpoints in {args.out})", flush=True
    )
    print(f"image accuracy: {acc_img:.2f} | question-only baseline: {acc_blank:.2f}", flush=True)


if __name__ == "__main__":
    main()
