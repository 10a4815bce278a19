"""Result charts: a grouped bar chart per metric (checkpoints x datasets), ROC curves per class.

:func:`bar_charts` draws one PNG per metric from the rows of eval's results table (the same
``{checkpoint, dataset, metrics}`` dicts :func:`medtune.eval.report.results_table` reads): datasets
on the x axis, one bar per checkpoint in each group, the value printed on every bar (4 decimals,
as in ``results.md``). :func:`roc_curves` draws, for classification predictions
(``labels``/``scores`` rows, :mod:`medtune.eval.predictions`), one ROC curve per class that holds both label values,
with the AUROC that :func:`medtune.eval.classification_metrics.score_classification_rows` reports
(sklearn ``roc_curve`` / ``roc_auc_score``).

matplotlib's object API (``Figure`` on the Agg canvas): no display, no pyplot state.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHART_PX", "bar_chart", "bar_charts", "chart_metrics", "roc_curves", "roc_figure"]

#: width, height in pixels of the bar charts and ROC figures
CHART_PX = (1000, 600)
_DPI = 100

# counts, not scores: never drawn as bars
_COUNT = re.compile(r"^n($|_)")


def chart_metrics(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric names to draw: every top-level finite number in the metrics objects.

    Counts (``n``, ``n_closed``, ...) and nested objects (breakdowns, per-class blocks) are left
    out; the order is the first appearance.
    """
    keys: list[str] = []
    for r in results:
        for k, v in r["metrics"].items():
            if _COUNT.match(k) or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v) and k not in keys:
                keys.append(k)
    return keys


def bar_chart(metric: str, results: Sequence[Mapping[str, Any]]):
    """One grouped bar chart: datasets on x, a bar per checkpoint, values printed on the bars.

    Args:
        metric: key in each ``metrics`` object.
        results: ``{checkpoint, dataset, metrics}`` dicts; pairs without the metric get no bar.

    Returns:
        A matplotlib ``Figure``; bar ``i`` of checkpoint ``c`` is ``results``' value for
        ``(c, datasets[i])`` (read them back from ``fig.axes[0].containers``, one per checkpoint,
        labelled with the checkpoint name).
    """
    from matplotlib.figure import Figure

    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in results))
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    value = {
        (r["checkpoint"], r["dataset"]): r["metrics"].get(metric)
        for r in results
        if isinstance(r["metrics"].get(metric), (int, float))
    }
    w, h = CHART_PX
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
    ax = fig.subplots()
    n = len(checkpoints)
    width = 0.8 / n
    x = np.arange(len(datasets))
    for i, ckpt in enumerate(checkpoints):
        idx = [j for j, d in enumerate(datasets) if (ckpt, d) in value]
        vals = [float(value[(ckpt, datasets[j])]) for j in idx]
        bars = ax.bar(x[idx] + (i - (n - 1) / 2) * width, vals, width, label=ckpt)
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(x, datasets)
    ax.set_ylabel(metric)
    ax.set_title(metric)
    top = max((abs(float(v)) for v in value.values()), default=1.0)
    if all(0 <= float(v) <= 1 for v in value.values()):
        ax.set_ylim(0, 1.12)  # fractions: a common scale across charts, room for the labels
    else:
        ax.set_ylim(min(0.0, *(float(v) for v in value.values())), top * 1.15 or 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def save_png(fig, path: Path) -> Path:
    """Write a figure as PNG atomically (temp file then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=_DPI)
    os.replace(tmp, path)
    return path


def bar_charts(
    results: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/<metric>.png`` for each metric (default :func:`chart_metrics`).

    Args:
        results: ``{checkpoint, dataset, metrics}`` dicts (eval's results rows).
        out_dir: folder for the PNGs (created).
        metrics: metric names to draw; default every top-level number.

    Returns:
        The PNG paths, one per metric, in order.
    """
    out = Path(out_dir)
    paths = []
    for m in metrics if metrics is not None else chart_metrics(results):
        paths.append(save_png(bar_chart(m, results), out / f"{_safe(m)}.png"))
    return paths


def roc_figure(rows: Sequence[Mapping[str, Any]], title: str = "ROC"):
    """ROC curves per class of classification rows (``labels`` {class: 0|1}, ``scores``).

    Args:
        rows: classification predictions rows.
        title: figure title.

    Returns:
        ``(fig, curves)``: the Figure and ``{class: (fpr, tpr, auroc)}`` for each class with both
        label values (the others cannot have a ROC curve and are named in the title).
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    classes = list(dict.fromkeys(c for r in rows for c in r["labels"]))
    curves, skipped = {}, []
    for c in classes:
        y = np.asarray([int(r["labels"][c]) for r in rows if c in r["labels"]])
        s = np.asarray([float(r["scores"][c]) for r in rows if c in r["labels"]])
        if len(np.unique(y)) < 2:
            skipped.append(c)
            continue
        fpr, tpr, _ = roc_curve(y, s)
        curves[c] = (fpr, tpr, float(roc_auc_score(y, s)))
    w, h = CHART_PX
    fig = Figure(figsize=(h / _DPI * 1.25, h / _DPI), dpi=_DPI)
    ax = fig.subplots()
    for c, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{c} (AUROC {auc:.3f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    note = f" ({len(skipped)} class(es) with one label value: no curve)" if skipped else ""
    ax.set_title(title + note, fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower right", ncol=1 if len(curves) <= 14 else 2)
    fig.tight_layout()
    return fig, curves


def roc_curves(
    rows: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, title: str = "ROC"
) -> Path:
    """Write :func:`roc_figure` as a PNG at ``out_path``."""
    fig, _ = roc_figure(rows, title)
    return save_png(fig, Path(out_path))
