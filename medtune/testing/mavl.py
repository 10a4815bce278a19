"""Tiny MAVL assets: a tiny BERT, disease and concept books for MAVL's 75 entities, a MIMIC-CXR
set in MedKLIP's entity-file layout, and a ChestX-ray14-layout set for zero-shot.

Synthetic scans (:func:`medtune.testing.synthetic.render_scan`): a drawn lesion is the entity
``nodule`` present at ``<side>_<part>_lung`` (``mass`` too when upper), otherwise ``normal`` is
present and ``nodule`` negated.

    python -m medtune.testing.mavl --out assets/tiny_mavl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from medtune.data.mavl_entities import MAVL_PATH_PREFIX

SIZE = 64


def write_books(out: Path) -> None:
    """``disease_book.json`` and ``concepts.json`` (2 aspects per entity) for the 75 entities + covid19."""
    from medtune.models.mavl.books import ENTITIES

    names = [*ENTITIES, "covid19"]
    words = {
        "nodule": "bright round lesion",
        "mass": "large lesion upper",
        "normal": "normal no lesion",
    }
    disease = {e: f"{words.get(e, e)} in the lung." for e in names}
    concepts = {
        e: [f"shape: {words.get(e, 'round')}.", f"location: {words.get(e, 'lung')}."] for e in names
    }
    (out / "disease_book.json").write_text(json.dumps(disease, indent=1))
    (out / "concepts.json").write_text(json.dumps(concepts, indent=1))


def write_tiny_mimic(out: Path, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """MedKLIP's layout: ``rad_graph_metric_{split}.json`` keyed by the authors' image paths,
    ``landmark_observation_adj_mtx.npy`` [N, 51, 75], images under ``files/``."""
    from PIL import Image

    from medtune.models.mavl.books import ANATOMY, ENTITIES
    from medtune.testing.synthetic import render_scan

    n = n or {"train": 32, "validate": 8, "test": 8}
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    labels = np.full((sum(n.values()), len(ANATOMY), len(ENTITIES)), -1, dtype=np.int8)
    ent, anat = ENTITIES.index, ANATOMY.index
    k = 0
    for split, count in n.items():
        ann = {}
        for _ in range(count):
            lesion = (
                None
                if pyrng.random() < 0.4
                else (pyrng.choice(["left", "right"]), pyrng.choice(["upper", "lower"]))
            )
            rel = f"files/p10/p1000{k:04d}/s5{k:07d}/{k:04d}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_scan("X-Ray", lesion, rng, SIZE)).convert("RGB").save(out / rel)
            if lesion:
                labels[k, anat(f"{lesion[0]}_{lesion[1]}_lung"), ent("nodule")] = 1
                if lesion[1] == "upper":
                    labels[k, anat(f"{lesion[0]}_upper_lung"), ent("mass")] = 1
                else:
                    labels[k, anat("lung_bases"), ent("mass")] = 0
            else:
                labels[k, anat("unspecified"), ent("normal")] = 1
                labels[k, anat("pulmonary"), ent("nodule")] = 0
            ann[f"{MAVL_PATH_PREFIX}/{rel}"] = {"labels_id": k}
            k += 1
        (out / f"rad_graph_metric_{split}.json").write_text(json.dumps(ann, indent=1))
    np.save(out / "landmark_observation_adj_mtx.npy", labels)
    return out


def _lesion_scans(n: int, seed: int):
    """(image uint8 [64, 64], lesion mask uint8 or None) x n; the drawn X-ray lesion is the only
    region darker than 40."""
    from medtune.testing.synthetic import render_scan

    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    for _ in range(n):
        lesion = (
            None
            if pyrng.random() < 0.4
            else (pyrng.choice(["left", "right"]), pyrng.choice(["upper", "lower"]))
        )
        img = render_scan("X-Ray", lesion, rng, SIZE)
        yield img, ((img < 40).astype(np.uint8) if lesion else None)


SPLITS = {"train": 16, "val": 8, "test": 12}


def write_tiny_rsna(out: Path, seed: int = 2) -> Path:
    """MAVL's RSNA split files (``ID, img_path, boxes, classes``) over PNG scans (box = the lesion's)."""
    import csv

    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    scans = _lesion_scans(sum(SPLITS.values()), seed)
    k = 0
    for split, n in SPLITS.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ID", "img_path", "boxes", "classes"])
            for _ in range(n):
                img, mask = next(scans)
                rel = f"images/rsna{k:04d}.png"
                Image.fromarray(img).save(out / rel)
                box = ""
                if mask is not None:
                    ys, xs = np.nonzero(mask)
                    box = (
                        f"{xs.min()};{ys.min()};{xs.max() - xs.min() + 1};{ys.max() - ys.min() + 1}"
                    )
                w.writerow([f"id-{k:04d}", rel, box, int(mask is not None)])
                k += 1
    return out


def write_tiny_siim(out: Path, seed: int = 3) -> Path:
    """MAVL's SIIM-ACR split files (``ImageId, EncodedPixels``) + ``processed_images/<id>.png``."""
    import csv

    from PIL import Image

    from medtune.eval.grounding import rle_encode

    (out / "processed_images").mkdir(parents=True, exist_ok=True)
    scans = _lesion_scans(sum(SPLITS.values()), seed)
    k = 0
    for split, n in SPLITS.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "EncodedPixels"])
            for _ in range(n):
                img, mask = next(scans)
                iid = f"1.2.276.0.{k}"
                Image.fromarray(img).save(out / "processed_images" / f"{iid}.png")
                w.writerow([iid, " " + (rle_encode(mask) if mask is not None else "-1")])
                k += 1
    return out


def make_tiny_mavl(out: str | Path, seed: int = 0) -> Path:
    """Write every MAVL asset under ``out`` (a folder marked complete is reused). Returns ``out``."""
    from medtune.testing.towers import write_tiny_bert, write_tiny_cxr14

    out = Path(out)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_bert(out / "tiny_bert", seed=seed)
    write_books(out)
    (out / "mimic").mkdir(exist_ok=True)
    write_tiny_mimic(out / "mimic", seed=seed)
    write_tiny_cxr14(out / "tiny_cxr14", n_train=8, n_test=16, seed=seed + 1)
    write_tiny_rsna(out / "rsna", seed=seed + 2)
    write_tiny_siim(out / "siim", seed=seed + 3)
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets/tiny_mavl")
    print(make_tiny_mavl(p.parse_args().out))


if __name__ == "__main__":
    main()


def build_cached_tiny_mavl() -> Path:
    """The assets built once into the test cache (``$MEDTUNE_TEST_ASSETS`` or the temp dir), keyed
    by this module's source and flock'd, for the test fixtures."""
    import fcntl
    import hashlib
    import os
    import shutil
    import tempfile

    h = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    base.mkdir(parents=True, exist_ok=True)
    out = base / f"mavl-{h}"
    with open(base / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / ".complete").exists():
                tmp = base / f"{out.name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                make_tiny_mavl(tmp)
                os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
