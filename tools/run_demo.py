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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def train(assets: Path, out: Path, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "medtune._cli.main", "run", "vision_finetune", "--config", "demo",
           f"assets_dir={assets}", f"output_dir={out}", "log_every_n_steps=1000", *extra]
    print("$ medtune " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    last = max(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    return last


def accuracy(ckpt: Path, split: str, blank: bool, batch_size: int = 32) -> float:
    from medtune.data import slake
    from medtune.data.chat import VisionChatDataset
    from medtune.generation import generate
    from medtune.models.loading import load_from_checkpoint

    model, tok, cfg = load_from_checkpoint(ckpt)
    samples = slake(cfg.dataset.root, split=split)
    ds = VisionChatDataset(samples, tok, image_token_id=model.image_token_id, tokens_per_image=model.tokens_per_image,
                           transforms=model.image_transforms, prompt_template=cfg.get("prompt_template"),
                           blank_images=blank)
    right = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        prompts = [ds.encode(ds.prepare(s, i + j), add_generation_prompt=True)[0] for j, s in enumerate(chunk)]
        loaded = [ds.load_images(s) for s in chunk]
        images = {k: torch.cat([x[k] for x in loaded]) for k in loaded[0]}
        outs = generate(model, prompts, pad_id=tok.pad_id, stop_tokens=tok.stop_tokens, images=images,
                        image_counts=torch.tensor([len(s.images) for s in chunk]), max_new_tokens=8)
        right += sum(tok.decode(o).strip().lower() == s.meta["answer"].strip().lower() for o, s in zip(outs, chunk))
    return right / len(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default="assets/tiny", type=Path)
    p.add_argument("--out", default="outputs/demo", type=Path)
    p.add_argument("--split", default="test")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    img_ckpt = train(args.assets, args.out / "image", [])
    blank_ckpt = train(args.assets, args.out / "blank", ["blank_images=True"])
    acc_img = accuracy(img_ckpt, args.split, blank=False)
    acc_blank = accuracy(blank_ckpt, args.split, blank=True)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s (checkpoints in {args.out})", flush=True)
    print(f"image accuracy: {acc_img:.2f} | question-only baseline: {acc_blank:.2f}", flush=True)


if __name__ == "__main__":
    main()
