"""Every figure and page of one eval ``output_dir``: what the eval recipe writes at its end.

:func:`write_eval_figures` reads the folder eval wrote (``checkpoints.json``,
``<ckpt>/<dataset>/{predictions.jsonl, metrics.json, per_row.jsonl}``) and adds

- ``charts/<metric>.png``: a grouped bar chart per metric, checkpoints x datasets, values on the
  bars (:func:`medtune.viz.charts.bar_charts`);
- ``<ckpt>/<dataset>/report.html``: the error-analysis page (:mod:`medtune.viz.report_page`), with
  every other checkpoint evaluated on that dataset offered side by side;
- ``<ckpt>/<dataset>/roc.png`` for classification predictions (``labels`` / ``scores`` rows).

:func:`score_figures` does the same for files given to ``medtune score --charts DIR``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtune.eval.classification_metrics import is_classification_row
from medtune.eval.predictions import read_predictions
from medtune.utils.errors import UserError
from medtune.utils.jsonl import read_jsonl
from medtune.viz.charts import bar_charts, roc_curves
from medtune.viz.report_data import page_data, read_verdicts
from medtune.viz.report_page import write_page

__all__ = ["eval_pairs", "score_figures", "write_eval_figures"]


def eval_pairs(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The (checkpoint, dataset) pairs of an eval folder, in the order of ``checkpoints.json``.

    Returns:
        ``{checkpoint, dataset, dir, metrics}`` per pair that has a ``metrics.json``.
    """
    out = Path(output_dir)
    names_file = out / "checkpoints.json"
    if names_file.is_file():
        names = list(json.loads(names_file.read_text("utf-8")))
    else:
        names = sorted(p.name for p in out.iterdir() if p.is_dir())
    pairs = []
    for name in names:
        for ds_dir in sorted(p for p in (out / name).glob("*") if p.is_dir()):
            mfile = ds_dir / "metrics.json"
            if not mfile.is_file():
                continue
            try:
                metrics = json.loads(mfile.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{mfile}: not a metrics JSON ({e})") from None
            pairs.append(
                {"checkpoint": name, "dataset": ds_dir.name, "dir": ds_dir, "metrics": metrics}
            )
    return pairs


def _rows(path: Path) -> list[dict[str, Any]]:
    return read_predictions(path, validate=False) if path.is_file() else []


def write_eval_figures(
    output_dir: str | os.PathLike,
    *,
    images: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    image_roots: Mapping[str, str | os.PathLike] | None = None,
    judge: Sequence[str | os.PathLike] | None = None,
    thumbnails: bool = True,
) -> list[Path]:
    """Write the charts and report pages of an eval ``output_dir``.

    Args:
        output_dir: the eval recipe's ``output_dir``.
        images: ``{dataset: {str(question id): [image paths]}}`` (the eval recipe passes its
            samples' paths); else each row's ``image`` is resolved against ``image_roots``.
        image_roots: ``{dataset: root folder}`` for rows' relative ``image`` paths.
        judge: ``vqa_judge`` ``verdicts.jsonl`` file(s): adds the judge's verdict to the pages.
        thumbnails: embed image thumbnails in the pages.

    Returns:
        Paths written: the charts, then per pair its ``report.html`` (and ``roc.png``).
    """
    out = Path(output_dir)
    pairs = eval_pairs(out)
    if not pairs:
        raise UserError(
            f"{out}: no <checkpoint>/<dataset>/metrics.json in it (not an eval folder?)"
        )
    written = bar_charts(pairs, out / "charts")
    verdicts = read_verdicts(judge) if judge else None
    rows = {(p["checkpoint"], p["dataset"]): _rows(p["dir"] / "predictions.jsonl") for p in pairs}
    for p in pairs:
        own = rows[(p["checkpoint"], p["dataset"])]
        if not own:
            continue
        if all(map(is_classification_row, own)):
            path = p["dir"] / "roc.png"
            written.append(roc_curves(own, path, f"ROC - {p['checkpoint']} x {p['dataset']}"))
            continue
        others = [
            (q["checkpoint"], rows[(q["checkpoint"], q["dataset"])])
            for q in pairs
            if q["dataset"] == p["dataset"] and q["checkpoint"] != p["checkpoint"]
        ]
        per_row = {
            q["checkpoint"]: list(read_jsonl(q["dir"] / "per_row.jsonl"))
            for q in pairs
            if q["dataset"] == p["dataset"] and (q["dir"] / "per_row.jsonl").is_file()
        }
        data = page_data(
            [(p["checkpoint"], own), *others],
            dataset=p["dataset"],
            summary=p["metrics"],
            images=(images or {}).get(p["dataset"]),
            image_root=(image_roots or {}).get(p["dataset"]),
            verdicts=verdicts,
            per_row=per_row,
            thumbnails=thumbnails,
        )
        written.append(write_page(data, p["dir"] / "report.html"))
    return written


def score_figures(
    scored: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    judge: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """Charts (and pages) for ``medtune score FILE ... --charts DIR``.

    Args:
        scored: ``{file path: metrics JSON}`` as ``medtune score`` computed them.
        out_dir: where to write: ``<metric>.png`` bar charts over the files (checkpoint and
            dataset read from each file's first row), ``roc_<n>.png`` for classification files,
            ``report_<n>.html`` for VQA / caption files (``n`` = the file's position).
        image_root: dataset root for the rows' relative ``image`` paths (thumbnails).
        judge: ``vqa_judge`` verdict file(s) for the pages.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = read_verdicts(judge) if judge else None
    results, written = [], []
    for i, (path, metrics) in enumerate(scored.items()):
        p = Path(path)
        rows = [] if p.suffix == ".safetensors" else _rows(p)
        first = rows[0] if rows else {}
        ckpt = str(first.get("checkpoint") or p.parent.parent.name or p.stem)
        ckpt = Path(ckpt).name if "/" in ckpt else ckpt
        dataset = str(first.get("dataset") or p.parent.name or p.stem)
        results.append({"checkpoint": ckpt, "dataset": dataset, "metrics": metrics})
        if rows and all(map(is_classification_row, rows)):
            written.append(roc_curves(rows, out / f"roc_{i}.png", f"ROC - {ckpt} x {dataset}"))
        elif rows:
            data = page_data(
                [(ckpt, rows)],
                dataset=dataset,
                summary=metrics,
                image_root=image_root,
                verdicts=verdicts,
            )
            written.append(write_page(data, out / f"report_{i}.html"))
    return bar_charts(results, out) + written
