#!/usr/bin/env python
"""Convert SLAKE, VQA-RAD, ROCO, caption JSON or X-ray reports to ShareGPT JSON for ``sharegpt()``.

Usage::

    python tools/convert_to_sharegpt.py --dataset slake --input data/Slake1.0 --split train \
        --output slake_train.json [--lang en|zh|all] [--relative]
    python tools/convert_to_sharegpt.py --dataset vqa_rad --input "data/VQA_RAD" --split test --output rad_test.json
    python tools/convert_to_sharegpt.py --dataset caption --input captions.json [--image-root figs] \
        [--split train] --output captions_sharegpt.json
    python tools/convert_to_sharegpt.py --dataset roco --input roco-dataset --split train --output roco_train.json
    python tools/convert_to_sharegpt.py --dataset openi --input data/openi [--section findings|impression|both] \
        --output openi.json          # OpenI has no official split: all reports
    python tools/convert_to_sharegpt.py --dataset mimic_cxr --input data/mimic-cxr-jpg --split validate \
        --output mimic_val.json
    python tools/convert_to_sharegpt.py --dataset xraygpt --input dataset/openi --output xraygpt_openi.json

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
from medtune.data.report_readers import mimic_cxr, openi, xraygpt
from medtune.utils.errors import run_entry
from medtune.utils.jsonl import write_text_atomic


def read_samples(
    dataset: str,
    input: str,
    split: str | None,
    lang: str | None = "en",
    image_root: str | None = None,
    skip_bad_rows: bool = False,
    section: str = "findings",
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
    if dataset == "openi":
        return openi(input, section=section, split=split, skip_bad_rows=skip_bad_rows)
    if dataset == "mimic_cxr":
        return mimic_cxr(input, split or "train", section=section, skip_bad_rows=skip_bad_rows)
    if dataset == "xraygpt":
        return xraygpt(input, skip_bad_rows=skip_bad_rows)
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


DATASETS = ["slake", "vqa_rad", "roco", "caption", "openi", "mimic_cxr", "xraygpt"]
#: Datasets read whole without --split (OpenI has no official split; XrayGPT ships one file).
NO_SPLIT = ("caption", "openi", "xraygpt")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--input",
        required=True,
        help="SLAKE folder, VQA-RAD folder, ROCO clone, caption JSON, OpenI (Kaggle) folder, "
        "MIMIC-CXR-JPG folder or XrayGPT dataset folder",
    )
    p.add_argument(
        "--split",
        default=None,
        help="slake, roco: train/validation/test; vqa_rad: train/test; mimic_cxr: "
        "train/validate/test; caption: optional split filter; openi, xraygpt: none",
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
    p.add_argument(
        "--section",
        default="findings",
        choices=["findings", "impression", "both"],
        help="openi, mimic_cxr: the report section that is the target (default findings)",
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) bad rows")
    args = p.parse_args(argv)
    if args.dataset not in NO_SPLIT and args.split is None:
        p.error(f"--split is required for {args.dataset}")
    samples = read_samples(
        args.dataset,
        args.input,
        args.split,
        None if args.lang == "all" else args.lang,
        args.image_root,
        args.skip_bad_rows,
        args.section,
    )
    rows = to_sharegpt(samples, args.output, args.relative)
    # atomic: an interrupted run leaves the old file or none, never half a JSON list
    write_text_atomic(args.output, json.dumps(rows, ensure_ascii=False, indent=1))
    print(f"wrote {len(rows)} conversations to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry("convert_to_sharegpt", main))
