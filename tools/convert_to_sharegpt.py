#!/usr/bin/env python
"""Convert SLAKE, VQA-RAD, ROCO or caption JSON to ShareGPT JSON that ``medtune.data.sharegpt`` reads.

Usage::

    python tools/convert_to_sharegpt.py --dataset slake --input data/Slake1.0 --split train \
        --output slake_train.json [--lang en|zh|all] [--relative]
    python tools/convert_to_sharegpt.py --dataset vqa_rad --input "data/VQA_RAD" --split test --output rad_test.json
    python tools/convert_to_sharegpt.py --dataset caption --input captions.json [--image-root figs] \
        [--split train] --output captions_sharegpt.json
    python tools/convert_to_sharegpt.py --dataset roco --input roco-dataset --split train --output roco_train.json

Each row::

    {"id": ..., "image": <path>, "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                                                   {"from": "gpt", "value": <answer>}],
     "meta": {<the sample's metadata>}}

(``"image"`` is a list when a sample has several images; one ``<image>\\n`` per image precedes
the first human turn.) The question is the raw one: templates are applied at training time.

Image path rule: absolute paths by default. With ``--relative`` they are written relative to the
output file's folder, which is where ``sharegpt(path)`` resolves relative paths when no
``image_root`` is given, so the output reads back the same either way (as long as it and the
images stay put, or move together with ``--relative``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medtune.data import IMAGE_MARKER, Sample, caption_json, roco, slake, vqa_rad


def read_samples(
    dataset: str,
    input: str,
    split: str | None,
    lang: str | None = "en",
    image_root: str | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read ``input`` with the medtune reader for ``dataset``."""
    if dataset == "slake":
        return slake(input, split or "train", lang=lang, skip_bad_rows=skip_bad_rows)
    if dataset == "vqa_rad":
        return vqa_rad(input, split or "train", skip_bad_rows=skip_bad_rows)
    if dataset == "caption":
        return caption_json(input, image_root=image_root, split=split, skip_bad_rows=skip_bad_rows)
    if dataset == "roco":
        return roco(input, split or "train", skip_bad_rows=skip_bad_rows)
    raise ValueError(f"unknown dataset {dataset!r}")


def to_sharegpt(samples: list[Sample], output: str | Path, relative: bool = False) -> list[dict]:
    """ShareGPT rows for ``samples``; paths absolute, or relative to ``output``'s folder."""
    out_dir = Path(output).resolve().parent
    rows = []
    for s in samples:
        paths = [os.path.abspath(p) for p in s.image_paths]
        if relative:
            paths = [os.path.relpath(p, out_dir) for p in paths]
        conversations = []
        first_user = True
        for m in s.messages:
            text = m.content
            if m.role == "user" and first_user:
                first_user = False
                if IMAGE_MARKER not in text:
                    text = (IMAGE_MARKER + "\n") * len(paths) + text
            conversations.append(
                {"from": {"user": "human", "assistant": "gpt"}.get(m.role, m.role), "value": text}
            )
        row = {"id": s.id}
        if paths:
            row["image"] = paths[0] if len(paths) == 1 else paths
        row["conversations"] = conversations
        row["meta"] = s.meta
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=["slake", "vqa_rad", "roco", "caption"])
    p.add_argument(
        "--input", required=True, help="SLAKE folder, VQA-RAD folder, ROCO clone or caption JSON"
    )
    p.add_argument(
        "--split",
        default=None,
        help="slake, roco: train/validation/test; vqa_rad: train/test; caption: optional split filter",
    )
    p.add_argument("--output", required=True, help="output ShareGPT JSON file")
    p.add_argument(
        "--lang", default="en", choices=["en", "zh", "all"], help="SLAKE q_lang (default en)"
    )
    p.add_argument("--image-root", default=None, help="caption: folder image paths are relative to")
    p.add_argument(
        "--relative",
        action="store_true",
        help="write image paths relative to the output file's folder (default absolute)",
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) bad rows")
    args = p.parse_args(argv)
    if args.dataset != "caption" and args.split is None:
        p.error(f"--split is required for {args.dataset}")
    samples = read_samples(
        args.dataset,
        args.input,
        args.split,
        None if args.lang == "all" else args.lang,
        args.image_root,
        args.skip_bad_rows,
    )
    rows = to_sharegpt(samples, args.output, args.relative)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(rows)} conversations to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
