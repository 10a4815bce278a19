"""The data behind ``report.html``: every question, its thumbnail, and whether each rule counted it.

:func:`page_data` turns the predictions rows of one dataset (one list per checkpoint, the first
the page's own) into the JSON object the page renders. Right / wrong per row comes from the same
functions that make the metrics (:func:`medtune.eval.vqa_metrics.score_row`), so the page's counts
equal ``metrics.json``'s:

- rule ``strict``: ``closed_accuracy_strict`` on CLOSED rows, ``open_exact_match`` on OPEN rows;
- rule ``llava_med``: ``closed_accuracy_llava_med`` on CLOSED rows, ``open_hit_llava_med`` on OPEN
  rows (LLaVA-Med's substring rules);
- rule ``judge`` (when a ``verdicts.jsonl`` of ``vqa_judge`` is given): the verdict of the row's
  cache key (:func:`medtune.eval.judge.store.row_key`), RIGHT / WRONG; UNPARSED counts as neither.

Rows the metrics do not score (empty answer, other answer type, captions) have no verdict
(``null``): they are shown, and never counted as right or wrong. Caption rows show their
per-report scores from ``per_row.jsonl`` when eval wrote one.

Thumbnails: :func:`thumbnail` opens the image with :func:`medtune.data.images.load_image` (DICOM
rescaled and windowed exactly as the readers feed the model: VOI LUT / window / modality preset,
MONOCHROME1 inverted) and embeds a JPEG as a data URL, once per distinct image.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtune.eval.judge.store import row_key
from medtune.eval.vqa_metrics import score_row
from medtune.utils.errors import UserError
from medtune.utils.jsonl import read_jsonl

__all__ = ["RULES", "page_data", "read_verdicts", "resolve_image", "row_verdicts", "thumbnail"]

#: rule name -> (metric on CLOSED rows, metric on OPEN rows); "judge" is added by verdicts
RULES = {
    "strict": ("closed_accuracy_strict", "open_exact_match"),
    "llava_med": ("closed_accuracy_llava_med", "open_hit_llava_med"),
}
THUMB_PX = 160
#: distinct images embedded per page (about 5 KB each as 160 px JPEG)
MAX_THUMBNAILS = 4000


def _finite(v: Any) -> bool:
    """A number the page can show (JSON has no NaN; booleans are not metrics)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def thumbnail(path: str | os.PathLike, max_side: int = THUMB_PX) -> str:
    """A JPEG data URL of the image, at most ``max_side`` pixels on its longer side.

    Raises:
        medtune.data.errors.ImageLoadError: missing or unreadable file (the message names it).
    """
    from PIL import Image

    from medtune.data.images import load_image

    img = load_image(path)
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def resolve_image(
    row: Mapping[str, Any],
    images: Mapping[str, Sequence[str]] | None = None,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """The image file(s) of a predictions row.

    Args:
        row: a predictions row (``image``: a path or list of paths, relative to the dataset root).
        images: ``{str(id): [path, ...]}`` known by the caller (eval passes its samples' paths).
        root: the dataset root that ``image`` is relative to.

    Returns:
        Paths (absolute when found); empty when the row names no image.
    """
    if images is not None and str(row.get("id")) in images:
        return [str(p) for p in images[str(row.get("id"))]]
    ref = row.get("image")
    refs = [ref] if isinstance(ref, str) and ref else list(ref or [])
    out = []
    for r in refs:
        p = Path(str(r))
        if not p.is_absolute() and root is not None and (Path(root) / p).exists():
            p = Path(root) / p
        out.append(str(p))
    return out


def read_verdicts(paths: Sequence[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{row key: verdict row}`` of ``vqa_judge`` verdict files (the last row per key wins).

    Raises:
        UserError: a file is missing or a row has no ``key`` / ``verdict``.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"judge verdicts file not found: {path}")
        for i, v in enumerate(read_jsonl(path), 1):
            if not isinstance(v, dict) or "key" not in v or "verdict" not in v:
                raise UserError(f"{path}:{i}: expected a verdict row with 'key' and 'verdict'")
            out[str(v["key"])] = v
    return out


def row_verdicts(
    row: Mapping[str, Any], verdicts: Mapping[str, Mapping[str, Any]] | None
) -> tuple[dict[str, float], dict[str, bool | None]]:
    """(metric values, {rule: right?}) of one predictions row; ``None`` = not scored by that rule."""
    scores = score_row(row) or {}
    metrics = {k: v for k, v in scores.items() if k != "answer_type"}
    ok: dict[str, bool | None] = {}
    kind = scores.get("answer_type")
    for rule, (closed_key, open_key) in RULES.items():
        key = closed_key if kind == "CLOSED" else open_key
        ok[rule] = None if key not in metrics else metrics[key] >= 1.0
    if verdicts is not None:
        v = verdicts.get(row_key(row))
        word = str(v["verdict"]).upper() if v else None
        ok["judge"] = True if word == "RIGHT" else False if word == "WRONG" else None
    return metrics, ok


def page_data(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    *,
    dataset: str,
    summary: Mapping[str, Any] | None = None,
    images: Mapping[str, Sequence[str]] | None = None,
    image_root: str | os.PathLike | None = None,
    verdicts: Mapping[str, Mapping[str, Any]] | None = None,
    per_row: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
    thumbnails: bool = True,
    max_thumbnails: int = MAX_THUMBNAILS,
) -> dict[str, Any]:
    """The JSON object ``report.html`` renders.

    Args:
        runs: ``(checkpoint name, predictions rows)``; the first is the page's checkpoint, the
            others are offered in the side-by-side mode (matched by question ``id``).
        dataset: dataset name (title).
        summary: the page checkpoint's metrics JSON (top-level numbers are shown).
        images: ``{str(id): [image paths]}`` (from eval's samples); else ``image`` is resolved
            against ``image_root``.
        image_root: the dataset root the rows' ``image`` paths are relative to.
        verdicts: ``vqa_judge`` verdicts by row key (adds the ``judge`` rule).
        per_row: ``{checkpoint name: per_row.jsonl rows}`` of caption datasets (scores shown).
        thumbnails: embed thumbnails (False: paths only).
        max_thumbnails: embed at most this many distinct images (a page stays a few MB on a
            benchmark of tens of thousands of images); the others show their path, and the page
            says how many (``thumbnails_left_out``).

    Returns:
        ``{title, dataset, checkpoints, rules, summary, images: {key: data URL | error},
        rows: [{id, question, answer, answer_type, modality, language, image, preds:
        {checkpoint: {prediction, metrics, ok}}}]}``.
    """
    if not runs:
        raise UserError("report: no predictions to show")
    names = [n for n, _ in runs]
    by_id = [{str(r.get("id")): r for r in rows} for _, rows in runs]
    caption_scores = {
        name: {str(r.get("id")): r for r in (per_row or {}).get(name, [])} for name in names
    }
    out_rows, img_keys = [], {}
    for row in runs[0][1]:
        rid = str(row.get("id"))
        paths = resolve_image(row, images, image_root)
        key = "|".join(paths)
        if key and key not in img_keys:
            img_keys[key] = paths[0]
        preds = {}
        for name, table in zip(names, by_id):
            other = table.get(rid)
            if other is None:
                continue
            metrics, ok = row_verdicts(other, verdicts)
            if not metrics and rid in caption_scores[name]:
                metrics = caption_scores[name][rid]
            metrics = {k: v for k, v in metrics.items() if _finite(v)}
            preds[name] = {"prediction": str(other.get("prediction", "")), "metrics": metrics}
            preds[name]["ok"] = ok
        out_rows.append(
            {
                "id": rid,
                "question": str(row.get("question", "")),
                "answer": row.get("answer")
                if isinstance(row.get("answer"), list)
                else str(row.get("answer", "")),
                "answer_type": str(row.get("answer_type", "")).strip().upper(),
                "modality": str(row.get("modality", "") or ""),
                "language": str(row.get("language", "") or ""),
                "image": key,
                "preds": preds,
            }
        )
    embedded = {}
    for i, (key, path) in enumerate(img_keys.items()):
        if not thumbnails or i >= max_thumbnails:
            embedded[key] = {"path": path}
            continue
        try:
            embedded[key] = {"path": path, "src": thumbnail(path)}
        except UserError as e:  # ImageLoadError is one: the cell says which file and why
            embedded[key] = {"path": path, "error": str(e)}
    rules = list(RULES) + (["judge"] if verdicts is not None else [])
    numbers = {k: v for k, v in (summary or {}).items() if _finite(v)}
    return {
        "title": f"{names[0]} x {dataset}",
        "dataset": dataset,
        "checkpoints": names,
        "rules": rules,
        "summary": numbers,
        "images": embedded,
        "thumbnails_left_out": max(0, len(img_keys) - max_thumbnails) if thumbnails else 0,
        "rows": out_rows,
    }
