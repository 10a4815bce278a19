"""Tiny generated copies of the benchmark layouts (:mod:`medtune.data.benchmarks`), for tests and demos.

:func:`make_benchmark_fixtures` writes, under one folder, a few questions per benchmark in its
real download layout (parquet through pyarrow, csv, json, jsonl, image files), each image a
synthetic scan from :func:`medtune.testing.datasets.make_medical_image`:

    path-vqa/data/test-00000-of-00001.parquet          PathVQA (image struct, question, answer)
    vqa-rad/data/test-00000-of-00001.parquet           VQA-RAD hub copy
    PMC-VQA/test_2.csv + figures/                      PMC-VQA version 2
    OmniMedVQA/QA_information/Open-access/*.json + Images/
    MedXpertQA/MM/test.jsonl + images/                 several images per question
    MMMU/<health subject>/validation-00000-of-00001.parquet

Registered in :data:`medtune.testing.demo_assets.DEMO_ASSETS` as ``benchmarks``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from medtune.data.benchmarks.mmmu_parquet import MMMU_HEALTH_SUBJECTS
from medtune.testing.datasets import make_medical_image

__all__ = ["COUNTS", "make_benchmark_fixtures", "png_bytes", "write_parquet"]

#: questions per benchmark in the fixtures (the tests check the readers return exactly these).
COUNTS = {
    "pathvqa": 6,
    "vqa_rad": 4,
    "pmc_vqa": 4,
    "omnimedvqa": 5,
    "medxpertqa_mm": 3,
    "mmmu_med": 5,
}
_MODALITIES = ("CT", "MRI", "X-Ray")


def png_bytes(seed: int, modality: str = "CT") -> bytes:
    """A synthetic scan as PNG bytes (what a parquet Image struct holds)."""
    buf = io.BytesIO()
    make_medical_image(seed, modality=modality, size=32).save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows -> one parquet file (pyarrow infers the schema; Image cells are ``{bytes, path}``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _save(path: Path, seed: int, modality: str = "CT") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_medical_image(seed, modality=modality, size=32).save(path)
    return path.name


def _vqa_parquet(root: Path, n: int, seed0: int) -> None:
    qa = [
        ("Is there a lesion?", "yes"),
        ("Is this normal tissue?", "no"),
        ("What organ is shown?", "liver"),
        ("What stain is used?", "hematoxylin and eosin"),
        ("Is the image abnormal?", "Yes"),
        ("How many nodules are seen?", "2"),
    ]
    rows = [
        {
            "image": {"bytes": png_bytes(seed0 + i, _MODALITIES[i % 3]), "path": f"img_{i}.png"},
            "question": qa[i][0],
            "answer": qa[i][1],
        }
        for i in range(n)
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)


def _pmc(root: Path) -> None:
    header = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C",
              "Choice D", "Answer", "split"]  # fmt: skip
    rows = []
    for i in range(COUNTS["pmc_vqa"]):
        fig = _save(root / "figures" / f"PMC{i}_F1.jpg", 100 + i, _MODALITIES[i % 3])
        rows.append([i, fig, f"Figure {i}.", "What modality is shown?", " A:CT", " B:MRI",
                     " C:X-ray", " D:Ultrasound", "ABCD"[i % 4], "test"])  # fmt: skip
    with open(root / "test_2.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _omni(root: Path) -> None:
    spec = {"Chest CT Scan": ("CT", 3), "Knee MRI": ("MR", 2)}
    k = 0
    for source, (modality, n) in spec.items():
        rows = []
        for j in range(n):
            rel = f"Images/{source}/{j}.png"
            _save(root / rel, 200 + k, "CT" if modality == "CT" else "MRI")
            opts = ["Normal", "Nodule", "Fracture", "Effusion"][: 4 - (j % 2) * 2]
            rows.append({
                "dataset": source, "question_id": f"{source}_{j}",
                "question_type": "Disease Diagnosis" if j % 2 else "Modality Recognition",
                "question": "What abnormality is seen?", "gt_answer": opts[j % len(opts)],
                "image_path": rel, "modality_type": modality,
                **{f"option_{c}": o for c, o in zip("ABCD", opts)},
            })  # fmt: skip
            k += 1
        folder = root / "QA_information" / "Open-access"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{source}.json").write_text(json.dumps(rows, indent=1))


def _medxpert(root: Path) -> None:
    (root / "MM").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(COUNTS["medxpertqa_mm"]):
        names = [
            _save(root / "images" / f"MM-{i}-{a}.jpeg", 300 + 2 * i + a) for a in range(1 + i % 2)
        ]
        lines.append(json.dumps({
            "id": f"MM-{i}", "question": f"A patient presents with pain. Which is most likely? {i}",
            "options": dict(zip("ABCDE", ["Fracture", "Tumor", "Infection", "Cyst", "Normal"])),
            "label": "ABCDE"[i], "images": names, "medical_task": "Diagnosis" if i % 2 else "Treatment",
            "body_system": "Skeletal", "question_type": "Reasoning" if i % 2 else "Understanding",
        }))  # fmt: skip
    (root / "MM" / "test.jsonl").write_text("\n".join(lines) + "\n")


def _mmmu(root: Path) -> None:
    for s, subject in enumerate(MMMU_HEALTH_SUBJECTS):
        opts = ["aspirin", "insulin", "heparin", "warfarin"][: 3 + s % 2]
        row = {
            "id": f"validation_{subject}_1",
            "question": "<image 1> Which drug is indicated?",
            "options": repr(opts),
            "explanation": "",
            **{f"image_{k}": None for k in range(1, 8)},
            "img_type": "['Photographs']",
            "answer": "ABCD"[s % len(opts)],
            "topic_difficulty": "Easy",
            "question_type": "multiple-choice",
            "subfield": "Pharmacology",
        }
        row["image_1"] = {"bytes": png_bytes(400 + s), "path": f"{subject}_1.png"}
        if s == 0:
            row["image_2"] = {"bytes": png_bytes(450), "path": f"{subject}_1b.png"}
        write_parquet(root / subject / "validation-00000-of-00001.parquet", [row])


def make_benchmark_fixtures(out: str | Path) -> Path:
    """Write every benchmark layout under ``out`` (reused when marked complete); returns ``out``."""
    out = Path(out)
    if (out / ".complete").is_file():
        return out
    _vqa_parquet(out / "path-vqa", COUNTS["pathvqa"], 0)
    _vqa_parquet(out / "vqa-rad", COUNTS["vqa_rad"], 50)
    _pmc(out / "PMC-VQA")
    _omni(out / "OmniMedVQA")
    _medxpert(out / "MedXpertQA")
    _mmmu(out / "MMMU")
    (out / ".complete").write_text("ok\n")
    return out
