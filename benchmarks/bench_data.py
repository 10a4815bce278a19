#!/usr/bin/env python
"""Images per second through ``load_image`` + ``image_transform(224, CLIP mean/std)`` in a DataLoader.

Compares 0 vs 2 DataLoader workers on:

- PNG 512x512 (synthetic grayscale scans saved as 8-bit RGB PNG, distinct files);
- DICOM CT_small.dcm (128x128, 16-bit, rescale + CT preset window) and MR_small.dcm (64x64, file
  window) from pydicom's test data;
- DICOM CT 512x512: CT_small's pixels upsampled to a typical CT slice size and saved as DICOM.

Usage::

    python benchmarks/bench_data.py [--n 512] [--batch-size 16] [--workers 0 2]

Prints one table: images/s per source and worker count, the ratio to 0 workers (steady state: the
first batch, worker start-up included, is not timed), and the single-process cost per image of
decoding (``load_image``) and of the transform.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader, Dataset

from medtune.data.images import CLIP_MEAN, CLIP_STD, image_transform, load_image
from medtune.testing.datasets import make_medical_image


class Files(Dataset):
    """``paths[i % len(paths)]`` -> tensor ``[3, 224, 224]``."""

    def __init__(self, paths: list[str], n: int) -> None:
        self.paths, self.n = paths, n
        self.transform = image_transform(224, CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i % len(self.paths)]))


def make_sources(tmp: Path) -> dict[str, list[str]]:
    pngs = []
    for k in range(32):
        p = tmp / f"scan{k}.png"
        make_medical_image(k, modality="CT", lesion="left", size=512).save(p)
        pngs.append(str(p))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))  # 128 -> 512
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    ct512 = tmp / "ct512.dcm"
    ds.save_as(ct512)
    return {
        "PNG 512x512": pngs,
        "DICOM CT_small 128x128": [get_testdata_file("CT_small.dcm")],
        "DICOM MR_small 64x64": [get_testdata_file("MR_small.dcm")],
        "DICOM CT 512x512 (16-bit)": [str(ct512)],
    }


def images_per_second(paths: list[str], n: int, batch_size: int, workers: int) -> float:
    loader = DataLoader(
        Files(paths, n + batch_size),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first decode
    t0 = time.perf_counter()
    count = 0
    for batch in it:
        count += batch.shape[0]
    return count / (time.perf_counter() - t0)


def stage_ms(paths: list[str], reps: int = 30) -> tuple[float, float]:
    """Mean milliseconds per image for ``load_image`` and for the transform, in this process."""
    transform = image_transform(224, CLIP_MEAN, CLIP_STD)
    t0 = time.perf_counter()
    images = [load_image(paths[i % len(paths)]) for i in range(reps)]
    t1 = time.perf_counter()
    for im in images:
        transform(im)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000 / reps, (t2 - t1) * 1000 / reps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread per worker, as in training; keeps the comparison fair
    with tempfile.TemporaryDirectory() as d:
        sources = make_sources(Path(d))
        for paths in sources.values():  # check they load before timing
            load_image(paths[0])
        print(
            f"load_image + image_transform(224), batch {args.batch_size}, {args.n} images, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}"
        )
        cols = [f"{w} workers img/s" for w in args.workers]
        cols += [f"{w}w / {args.workers[0]}w" for w in args.workers[1:]]
        cols += ["decode ms", "transform ms"]
        print("| " + " | ".join([f"{'source':<27}"] + cols) + " |")
        print("|" + "|".join("-" * (len(c) + 2) for c in [" " * 27] + cols) + "|")
        for name, paths in sources.items():
            rates = [images_per_second(paths, args.n, args.batch_size, w) for w in args.workers]
            cells = [f"{r:>{len(c)}.0f}" for r, c in zip(rates, cols)]
            cells += [
                f"{r / rates[0]:>{len(c) - 1}.2f}x" for r, c in zip(rates[1:], cols[len(rates) :])
            ]
            cells += [f"{v:>{len(c)}.1f}" for v, c in zip(stage_ms(paths), cols[-2:])]
            print("| " + " | ".join([f"{name:<27}"] + cells) + " |")


if __name__ == "__main__":
    main()
