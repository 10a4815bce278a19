"""The eval recipe's tables: readable checkpoint names and one markdown / CSV table across pairs."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from medtune.eval.caption_metrics import CAPTION_METRIC_KEYS
from medtune.eval.vqa_metrics import LLAVA_MED_CLOSED_NOTE, METRIC_KEYS

__all__ = [
    "CHEXBERT_TABLE_KEYS",
    "checkpoint_names",
    "csv_table",
    "markdown_table",
    "results_table",
]

#: The CheXbert F1 columns of the table (from ``metrics["chexbert"]``, :mod:`medtune.eval.chexbert`).
CHEXBERT_TABLE_KEYS = (
    "f1chexbert_all_micro_f1",
    "f1chexbert_all_macro_f1",
    "f1chexbert_5_micro_f1",
    "f1chexbert_5_macro_f1",
)


def checkpoint_names(paths: list[str]) -> list[str]:
    """Readable, unique names for checkpoint folders.

    The last two path components joined by ``_`` (``runs/run1/epoch_2`` -> ``run1_epoch_2``); more
    components are used while names collide, then a numeric suffix.

    Args:
        paths: checkpoint folder paths.

    Returns:
        One name per path, in order.
    """
    parts = [
        [re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in Path(os.path.abspath(x)).parts[1:]]
        or ["root"]
        for x in paths
    ]

    def name(i: int, k: int) -> str:
        return "_".join(parts[i][-k:])

    depth = [min(2, len(p)) for p in parts]
    while True:
        names = [name(i, depth[i]) for i in range(len(paths))]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def results_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the combined table.

    Args:
        rows: one dict per (checkpoint, dataset) with ``checkpoint``, ``dataset``, ``task`` and
            ``metrics`` (the metrics JSON).

    Returns:
        ``(columns, values)``: ``checkpoint, dataset, n, ...`` then the VQA metrics (when any VQA
        dataset is present), the caption metrics (when any caption dataset is present) and the
        CheXbert F1 columns (when any metrics JSON holds a ``chexbert`` object).
    """
    has_vqa = any(r["task"] == "vqa" for r in rows)
    has_cap = any(r["task"] == "caption" for r in rows)
    cols = ["checkpoint", "dataset", "n"]
    if has_vqa:
        cols += ["n_closed", "n_open", *METRIC_KEYS]
    if has_cap:
        cols += list(CAPTION_METRIC_KEYS)
    if any("chexbert" in r["metrics"] for r in rows):
        cols += list(CHEXBERT_TABLE_KEYS)
    out = []
    for r in rows:
        m = r["metrics"]
        vals: dict[str, Any] = {"checkpoint": r["checkpoint"], "dataset": r["dataset"]}
        if r["task"] == "vqa":
            vals["n"] = m["n_closed"] + m["n_open"]
        else:
            vals["n"] = m.get("n")
        vals.update({k: m.get(k) for k in cols if k in m and k not in vals})
        vals.update(
            {k: v for k, v in (m.get("chexbert") or {}).items() if k in CHEXBERT_TABLE_KEYS}
        )
        out.append([vals.get(c) for c in cols])
    return cols, out


def markdown_table(cols: list[str], values: list[list[Any]]) -> str:
    """A GitHub markdown table (floats with 4 decimals, missing values empty).

    When it shows ``closed_accuracy_llava_med`` next to the strict rule, a line under it says what
    that rule is (:data:`medtune.eval.vqa_metrics.LLAVA_MED_CLOSED_NOTE`).
    """
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in values]
    if "closed_accuracy_llava_med" in cols:
        lines += ["", LLAVA_MED_CLOSED_NOTE]
    return "\n".join(lines) + "\n"


def csv_table(cols: list[str], values: list[list[Any]]) -> str:
    """The same table as CSV (full precision, missing values empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in values:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()
