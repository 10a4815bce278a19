"""Multi-label classification metrics over predictions rows.

A row: ``{"id", "dataset", "split", "image", "labels": {class: 0|1}, "scores": {class: float}}``
(``zero_shot_classify`` writes them). A class missing from a row's ``labels`` (CheXpert's
uncertain labels under the ``ignore`` policy) leaves that row out of that class only; a labelled
class must have a score.

Metrics (every key names its rule; :data:`CLASSIFICATION_RULES` states them):

- ``auroc_macro``: mean of sklearn ``roc_auc_score`` over the classes whose labels hold both values;
  ``n_classes_skipped_single_label`` counts the others; ``auroc`` holds each scored class's value.
- ``f1_max_mavl`` / ``acc_at_f1_max_mavl``: MAVL's ``Zero-shot_classification/test.py`` rule over the
  same classes: per class sklearn ``precision_recall_curve``, F1 = 2PR/(P+R) (0 where P+R = 0), its
  maximum, the threshold ``thresholds[argmax F1]``, accuracy of ``score > threshold`` (strictly
  greater, as MAVL), means over classes. The threshold is picked on the scored set itself.
- ``f1_at_val_threshold`` / ``acc_at_val_threshold`` (when validation rows are given): each class's
  threshold is validation's max-F1 threshold (the rule above); on the test rows F1 of
  ``score >= threshold`` (the decision the PR curve's threshold stands for) and accuracy of
  ``score > threshold`` (MAVL's accuracy rule), so that validation == test reproduces the
  ``*_mavl`` numbers. Classes without both label values in validation are skipped
  (``n_classes_skipped_val``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune.utils.errors import UserError
from medtune.utils.jsonl import JsonlError, read_jsonl_numbered

__all__ = [
    "CLASSIFICATION_RULES",
    "ClassificationRowError",
    "is_classification_row",
    "validate_classification_row",
    "read_classification_rows",
    "max_f1_threshold",
    "score_classification_rows",
]

CLASSIFICATION_RULES = {
    "auroc_macro": "mean over classes with both label values of sklearn roc_auc_score(labels, scores)",
    "n_classes_skipped_single_label": "classes whose labels hold one value only (AUROC undefined); "
    "left out of every mean",
    "f1_max_mavl": "MAVL test.py: per class sklearn precision_recall_curve, F1 = 2PR/(P+R) "
    "(0 where P+R = 0), max over the curve; mean over classes (threshold picked on this set)",
    "acc_at_f1_max_mavl": "MAVL test.py: accuracy of score > thresholds[argmax F1] (strictly "
    "greater); mean over classes",
    "f1_at_val_threshold": "threshold = validation's max-F1 threshold per class; F1 of score >= "
    "threshold on these rows; mean over classes with both label values in both sets",
    "acc_at_val_threshold": "threshold as f1_at_val_threshold; accuracy of score > threshold "
    "(MAVL's rule); mean over the same classes",
    "missing labels": "a class absent from a row's labels (e.g. CheXpert uncertain, policy "
    "ignore) leaves that row out of that class",
}


class ClassificationRowError(UserError, ValueError):
    """A classification predictions row breaks the schema; the message names file and line."""


def is_classification_row(row: Any) -> bool:
    """A row of a classification predictions file (has ``labels`` and ``scores`` objects)."""
    return (
        isinstance(row, Mapping)
        and isinstance(row.get("labels"), Mapping)
        and isinstance(row.get("scores"), Mapping)
    )


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_classification_row(row: Any, where: str = "<row>") -> Mapping[str, Any]:
    """Check one row: ``id``, ``labels`` {class: 0|1}, ``scores`` {class: finite number}.

    Raises:
        ClassificationRowError: naming ``where`` and the key.
    """
    if not isinstance(row, Mapping):
        raise ClassificationRowError(f"{where}: a row must be a JSON object")
    if "id" not in row:
        raise ClassificationRowError(f"{where}: missing key 'id'")
    if not is_classification_row(row):
        raise ClassificationRowError(
            f"{where}: 'labels' and 'scores' must be objects {{class: value}}"
        )
    for cls, v in row["labels"].items():
        if v not in (0, 1) or isinstance(v, bool) or not _num(v):
            raise ClassificationRowError(
                f"{where}: labels[{cls!r}] is {v!r}, expected 0 or 1 (leave an unknown label out)"
            )
        if cls not in row["scores"]:
            raise ClassificationRowError(f"{where}: class {cls!r} has a label but no score")
    for cls, v in row["scores"].items():
        if not _num(v) or not math.isfinite(v):
            raise ClassificationRowError(
                f"{where}: scores[{cls!r}] is {v!r}, expected a finite number"
            )
    return row


def read_classification_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a classification predictions JSONL file (blank lines skipped).

    Raises:
        ClassificationRowError: a line is not JSON or breaks the schema (names file:line).
    """
    try:
        numbered = read_jsonl_numbered(path, what="predictions", strict=True)
    except JsonlError as e:
        raise ClassificationRowError(str(e)) from None
    rows = [dict(validate_classification_row(row, f"{path}:{n}")) for n, row in numbered]
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """class -> (labels int [n_c], scores float64 [n_c]) over the rows that label it."""
    labels: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    for n, row in enumerate(rows):
        validate_classification_row(row, f"row {n}")
        for cls, y in row["labels"].items():
            labels.setdefault(cls, []).append(int(y))
            scores.setdefault(cls, []).append(float(row["scores"][cls]))
    return {c: (np.asarray(labels[c]), np.asarray(scores[c], dtype=np.float64)) for c in labels}


def max_f1_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """MAVL's max-F1 rule for one class: ``(max F1, thresholds[argmax F1])``.

    Args:
        y: ``[n]`` 0/1 labels (both values present).
        s: ``[n]`` scores.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, s)
    num, den = 2 * recall * precision, recall + precision
    f1 = np.divide(num, den, out=np.zeros_like(den), where=den != 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (y == 1)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def score_classification_rows(
    rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """AUROC, MAVL's max-F1 metrics and (with validation rows) validation-threshold F1/accuracy.

    Args:
        rows: the scored (test) predictions rows.
        val_rows: validation predictions rows of the same classes, or None.

    Returns:
        ``{"n", "classes", "auroc_macro", "n_classes_skipped_single_label",
        "classes_skipped_single_label", "auroc": {class: value}, "f1_max_mavl",
        "acc_at_f1_max_mavl", "per_class": {class: {n, n_positive, auroc, f1_max_mavl,
        threshold_mavl, acc_at_f1_max_mavl[, val_threshold, f1_at_val_threshold,
        acc_at_val_threshold]}}[, "f1_at_val_threshold", "acc_at_val_threshold",
        "n_classes_skipped_val"], "datasets", "splits", "rules"}``. Means are None when no class
        has both label values.

    Raises:
        ClassificationRowError: a row breaks the schema, or two rows share an id.
    """
    from sklearn.metrics import roc_auc_score

    seen: set = set()
    for n, r in enumerate(rows):
        key = (r.get("dataset"), r.get("split"), r.get("id")) if isinstance(r, Mapping) else n
        if key in seen:
            raise ClassificationRowError(f"row {n}: id {r.get('id')!r} appears twice")
        seen.add(key)
    cols = _columns(rows)
    val_cols = _columns(val_rows) if val_rows is not None else None
    per_class: dict[str, dict[str, Any]] = {}
    skipped = []
    aurocs, f1s, accs, vf1s, vaccs = [], [], [], [], []
    n_val_skipped = 0
    for cls in sorted(cols):
        y, s = cols[cls]
        info: dict[str, Any] = {"n": int(y.size), "n_positive": int(y.sum())}
        per_class[cls] = info
        if y.min() == y.max():
            skipped.append(cls)
            continue
        info["auroc"] = float(roc_auc_score(y, s))
        f1, thr = max_f1_threshold(y, s)
        info.update(
            f1_max_mavl=f1, threshold_mavl=thr, acc_at_f1_max_mavl=float(np.mean((s > thr) == y))
        )
        aurocs.append(info["auroc"])
        f1s.append(f1)
        accs.append(info["acc_at_f1_max_mavl"])
        if val_cols is not None:
            vy, vs = val_cols.get(cls, (np.zeros(0, int), np.zeros(0)))
            if vy.size == 0 or vy.min() == vy.max():
                n_val_skipped += 1
                continue
            _, vthr = max_f1_threshold(vy, vs)
            info.update(
                val_threshold=vthr,
                f1_at_val_threshold=_f1(y, (s >= vthr).astype(int)),
                acc_at_val_threshold=float(np.mean((s > vthr) == y)),
            )
            vf1s.append(info["f1_at_val_threshold"])
            vaccs.append(info["acc_at_val_threshold"])
    out: dict[str, Any] = {
        "n": len(rows),
        "classes": sorted(cols),
        "auroc_macro": _mean(aurocs),
        "n_classes_skipped_single_label": len(skipped),
        "classes_skipped_single_label": skipped,
        "auroc": {c: per_class[c]["auroc"] for c in sorted(cols) if "auroc" in per_class[c]},
        "f1_max_mavl": _mean(f1s),
        "acc_at_f1_max_mavl": _mean(accs),
    }
    if val_cols is not None:
        out.update(
            f1_at_val_threshold=_mean(vf1s),
            acc_at_val_threshold=_mean(vaccs),
            n_classes_skipped_val=n_val_skipped,
            n_val=len(val_rows),
        )
    out["per_class"] = per_class
    out["datasets"] = sorted({str(r.get("dataset", "")) for r in rows})
    out["splits"] = sorted({str(r.get("split", "")) for r in rows})
    out["rules"] = dict(CLASSIFICATION_RULES)
    return out
