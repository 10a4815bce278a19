"""One results table for checkpoints x datasets (Markdown, CSV and JSON), with per-group breakdowns.

Rows are (checkpoint, dataset) pairs of any task and any backend; columns are every metric that
any pair has: VQA (medtune's named metrics and MedEvalKit's accuracies), multiple choice
(``mcq_accuracy``, ``n_mcq_no_option``), captions and CheXbert F1. The groups table has one row
per (checkpoint, dataset, group, value) from the metrics' ``by_<group>`` blocks (answer type,
language, modality, question type, subset, ...), with ``n`` and the group's metrics.

Files (:func:`write_results`): ``results.md`` (both tables), ``results.csv``,
``results_groups.csv`` and ``results.json`` (``{"columns", "rows", "group_columns", "groups",
"checkpoints"}``, rows as objects keyed by column).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.eval.caption_metrics import CAPTION_METRIC_KEYS
from medtune.eval.mcq import MCQ_METRIC_KEYS
from medtune.eval.medevalkit_vqa import MEDEVALKIT_VQA_KEYS
from medtune.eval.report import CHEXBERT_TABLE_KEYS, csv_table, markdown_table
from medtune.eval.vqa_metrics import METRIC_KEYS
from medtune.utils.jsonl import write_text_atomic

__all__ = ["group_table", "results_table", "write_results"]

#: the metric columns a group row may have, in table order
GROUP_METRICS = (*METRIC_KEYS, "mcq_accuracy", "n_mcq_no_option")


def _n(task: str, m: dict[str, Any]) -> Any:
    if task == "vqa":
        return m["n_closed"] + m["n_open"]
    if task == "mcq":
        return m["n_mcq"]
    return m.get("n")


def results_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the table.

    Args:
        results: one dict per pair: ``checkpoint``, ``dataset``, ``task`` (``vqa | mcq |
            caption``), ``metrics`` and optionally ``model`` (the backend).

    Returns:
        ``(columns, values)``: ``checkpoint, model, dataset, task, n`` then the columns of the
        tasks present (VQA: ``n_closed, n_open``, medtune's metrics, MedEvalKit's; mcq:
        ``mcq_accuracy, n_mcq_no_option``; captions; CheXbert F1 when any pair has it).
    """
    tasks = {r["task"] for r in results}
    cols = ["checkpoint", "model", "dataset", "task", "n"]
    if "vqa" in tasks:
        cols += ["n_closed", "n_open", *METRIC_KEYS, *MEDEVALKIT_VQA_KEYS]
    if "mcq" in tasks:
        cols += [k for k in MCQ_METRIC_KEYS if k != "n_mcq"]
    if "caption" in tasks:
        cols += list(CAPTION_METRIC_KEYS)
    if any("chexbert" in r["metrics"] for r in results):
        cols += list(CHEXBERT_TABLE_KEYS)
    values = []
    for r in results:
        m = r["metrics"]
        vals = {
            "checkpoint": r["checkpoint"],
            "model": r.get("model", "medtune"),
            "dataset": r["dataset"],
            "task": r["task"],
            "n": _n(r["task"], m),
        }
        vals.update({k: m[k] for k in cols if k in m and k not in vals})
        vals.update(
            {k: v for k, v in (m.get("chexbert") or {}).items() if k in CHEXBERT_TABLE_KEYS}
        )
        values.append([vals.get(c) for c in cols])
    return cols, values


def group_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The per-group table: one row per (checkpoint, dataset, group, value).

    ``group`` is the breakdown's name without ``by_`` (``answer_type``, ``modality``,
    ``question_type``, ``subset``, ...); ``n`` counts the scored questions of the group.
    """
    rows = []
    used: list[str] = []
    for r in results:
        m = r["metrics"]
        for key, block in m.items():
            if not key.startswith("by_") or not isinstance(block, dict) or key == "by_dataset":
                continue
            for value, g in block.items():
                if not isinstance(g, dict):
                    continue
                n = g["n_mcq"] if "n_mcq" in g else g.get("n_closed", 0) + g.get("n_open", 0)
                row = {"checkpoint": r["checkpoint"], "model": r.get("model", "medtune"),
                       "dataset": r["dataset"], "group": key[3:], "value": value, "n": n}  # fmt: skip
                for k in GROUP_METRICS:
                    if g.get(k) is not None:
                        row[k] = g[k]
                        if k not in used:
                            used.append(k)
                rows.append(row)
    cols = ["checkpoint", "model", "dataset", "group", "value", "n"]
    cols += [k for k in GROUP_METRICS if k in used]
    return cols, [[row.get(c) for c in cols] for row in rows]


def write_results(
    out_dir: str | Path, results: list[dict[str, Any]], checkpoints: dict[str, str]
) -> str:
    """Write ``results.md``, ``results.csv``, ``results_groups.csv`` and ``results.json``.

    Args:
        out_dir: the eval output folder.
        results: as for :func:`results_table`.
        checkpoints: name -> identity (path, or ``openai:<model>@<url>``).

    Returns:
        The Markdown text (main table, then the groups table when there are groups).
    """
    out_dir = Path(out_dir)
    cols, values = results_table(results)
    gcols, gvalues = group_table(results)
    md = markdown_table(cols, values)
    if gvalues:
        md += "\nPer group:\n\n" + markdown_table(gcols, gvalues)
    write_text_atomic(out_dir / "results.md", md)
    write_text_atomic(out_dir / "results.csv", csv_table(cols, values))
    write_text_atomic(out_dir / "results_groups.csv", csv_table(gcols, gvalues))
    doc = {
        "columns": cols,
        "rows": [dict(zip(cols, v)) for v in values],
        "group_columns": gcols,
        "groups": [dict(zip(gcols, v)) for v in gvalues],
        "checkpoints": checkpoints,
    }
    write_text_atomic(
        out_dir / "results.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    )
    return md
