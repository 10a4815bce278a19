#!/usr/bin/env python
"""Report images shared between the splits of SLAKE or VQA-RAD, by file name and by pixels.

Usage::

    python tools/check_split_leakage.py --dataset slake --input data/Slake1.0 [--fail-on-leak] [--json out.json]
    python tools/check_split_leakage.py --dataset vqa_rad --input data/VQA_RAD [--fail-on-leak]

Every question of every split is read (SLAKE: both languages). Two checks per pair of splits:

- by file name: the same image file referenced from both splits (SLAKE: Chinese train questions
  about English test images; VQA-RAD: test images that train questions also use);
- by pixel hash: different files whose decoded pixels (``load_image``, RGB) are identical.

Exit status: 1 when a leak is found and ``--fail-on-leak`` is given, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from collections import defaultdict

from medtune.data import load_image, slake, vqa_rad
from medtune.data.images import ImageLoadError
from medtune.utils.errors import run_entry
from medtune.utils.jsonl import write_text_atomic

SPLITS = {"slake": ("train", "validation", "test"), "vqa_rad": ("train", "test")}


def pixel_hash(path: str) -> str:
    """sha256 of the decoded RGB pixels and the image size."""
    img = load_image(path)
    h = hashlib.sha256(f"{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def find_leaks(dataset: str, input: str) -> dict:
    """Images shared between splits.

    Returns:
        ``{"dataset", "input", "images": {split: n}, "pairs": [{"splits": [a, b],
        "by_name": [{"image", a: {lang: n_questions}, b: {...}}],
        "by_pixels": [{a: image, b: image}]}], "leaks": total}``.
    """
    # split -> image (as written) -> lang -> question count ; image -> absolute path
    usage: dict[str, dict[str, dict[str, int]]] = {}
    path_of: dict[str, str] = {}
    for split in SPLITS[dataset]:
        samples = (
            slake(input, split, lang=None, skip_bad_rows=True)
            if dataset == "slake"
            else vqa_rad(input, split, skip_bad_rows=True)
        )
        per = defaultdict(lambda: defaultdict(int))
        for s in samples:
            per[s.meta["image"]][s.meta.get("language", "en")] += 1
            path_of[s.meta["image"]] = s.images[0]
        usage[split] = {k: dict(v) for k, v in per.items()}
    hashes: dict[str, str] = {}
    for name, path in sorted(path_of.items()):
        try:
            hashes[name] = pixel_hash(path)
        except ImageLoadError as e:
            print(f"warning: {e}", file=sys.stderr)
    report = {
        "dataset": dataset,
        "input": str(input),
        "images": {k: len(v) for k, v in usage.items()},
        "pairs": [],
        "leaks": 0,
    }
    for a, b in itertools.combinations(SPLITS[dataset], 2):
        shared = sorted(set(usage[a]) & set(usage[b]))
        by_name = [{"image": n, a: usage[a][n], b: usage[b][n]} for n in shared]
        hb = defaultdict(list)
        for n in usage[b]:
            if n in hashes:
                hb[hashes[n]].append(n)
        by_pixels = [
            {a: n, b: m}
            for n in sorted(usage[a])
            if n in hashes
            for m in hb.get(hashes[n], [])
            if m != n
        ]
        report["pairs"].append({"splits": [a, b], "by_name": by_name, "by_pixels": by_pixels})
        report["leaks"] += len(by_name) + len(by_pixels)
    return report


def _langs(d: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items()))


def format_report(r: dict) -> str:
    lines = [
        f"{r['dataset']} {r['input']}: images per split "
        + ", ".join(f"{k} {v}" for k, v in r["images"].items())
    ]
    for p in r["pairs"]:
        a, b = p["splits"]
        lines.append(
            f"{a} vs {b}: {len(p['by_name'])} shared by file name, "
            f"{len(p['by_pixels'])} identical pixels under different names"
        )
        for x in p["by_name"]:
            lines.append(
                f"  name   {x['image']}  ({a}: {_langs(x[a])}; {b}: {_langs(x[b])} questions)"
            )
        for x in p["by_pixels"]:
            lines.append(f"  pixels {a} {x[a]} == {b} {x[b]}")
    lines.append(
        f"LEAK: {r['leaks']} image(s) shared between splits" if r["leaks"] else "no leakage found"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(SPLITS))
    p.add_argument("--input", required=True, help="the SLAKE or VQA-RAD folder")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when any leak is found")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    report = find_leaks(args.dataset, args.input)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, ensure_ascii=False, indent=1))
    return 1 if report["leaks"] and args.fail_on_leak else 0


if __name__ == "__main__":
    sys.exit(run_entry("check_split_leakage", main))
