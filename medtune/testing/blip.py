"""Tiny BLIP assets (nothing is downloaded): ``make_tiny_blip(out)`` writes::

    out/tiny_bert/                 the tiny HF BERT folder (medtune.testing.towers.write_tiny_bert)
    out/figures/<n>.png            synthetic two-panel figures (two scans side by side, 128 x 64)
    out/subfigures_{train,val}.json   the subfigure layout of medtune.data.subfigures: per figure
                                   two boxes and their subcaptions (what each panel shows)
    out/captions/{train,val}.json  [{image, caption}] with two captions per image (retrieval:
                                   captions of one image are positives of each other)
    out/captions/images/<n>.png

The demo configs ``blip_pretrain/demo`` and ``blip_retrieval/demo`` read ``assets/tiny_blip``
(``make demo``; or ``python -m medtune.testing.blip --out assets/tiny_blip``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

TINY_VIT = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _figures(out: Path, n: dict[str, int], rng, pyrng) -> None:
    from PIL import Image

    from medtune.testing.synthetic import describe, render_scan
    from medtune.testing.towers import _scan

    (out / "figures").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, count in n.items():
        rows = []
        for _ in range(count):
            panels, subs = [], []
            for j in range(2):
                modality, lesion = _scan(rng, pyrng)
                panels.append(render_scan(modality, lesion, rng, 64))
                box = [64 * j, 0, 64 * j + 64, 64]
                subs.append(
                    {"box": box, "subcaption": describe(modality, lesion), "label": "ab"[j]}
                )
            name = f"figures/{k:04d}.png"
            Image.fromarray(np.concatenate(panels, axis=1)).save(out / name)
            rows.append({"id": f"fig{k}", "image": name, "caption": "", "subfigures": subs})
            k += 1
        (out / f"subfigures_{split}.json").write_text(json.dumps(rows, indent=1))


def _captions(out: Path, n: dict[str, int], rng, pyrng) -> None:
    from PIL import Image

    from medtune.testing.synthetic import describe, render_scan
    from medtune.testing.towers import _scan

    (out / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, count in n.items():
        rows = []
        for _ in range(count):
            modality, lesion = _scan(rng, pyrng)
            name = f"images/{k:04d}.png"
            Image.fromarray(render_scan(modality, lesion, rng, 64)).save(out / name)
            text = describe(modality, lesion)
            rows += [
                {"image": name, "caption": text},
                {"image": name, "caption": f"image of {text}"},
            ]
            k += 1
        (out / f"{split}.json").write_text(json.dumps(rows, indent=1))


def make_tiny_blip(out: str | Path, seed: int = 0) -> Path:
    """Write the assets under ``out`` (a folder marked complete is reused). Returns ``out``."""
    from medtune.testing.towers import write_tiny_bert

    out = Path(out)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_bert(out / "tiny_bert", seed=seed)
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    _figures(out, {"train": 16, "val": 4}, rng, pyrng)
    _captions(out / "captions", {"train": 16, "val": 6}, rng, pyrng)
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="write the tiny BLIP assets")
    p.add_argument("--out", default="assets/tiny_blip")
    print(f"tiny BLIP assets ready in {make_tiny_blip(p.parse_args().out)}")


if __name__ == "__main__":
    main()
