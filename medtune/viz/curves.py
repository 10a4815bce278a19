"""Training curves from torchtune ``DiskLogger`` metric logs: loss, learning rate, grad norm, speed.

Every training recipe calls :func:`plot_run` on rank 0 at each epoch end and at the end of the run
(``MEDTUNE_PLOTS=0`` in the environment turns that off);
``medtune plot RUN_DIR [RUN_DIR ...] --out DIR`` calls :func:`plot_runs` to draw several runs on
shared axes (say the demo's image run against its blank-image baseline).

What is read: the text files torchtune's ``DiskLogger`` writes under ``run_dir/logs``, one line per
``log_dict`` call (``Step 12 | loss:0.53 lr:1e-05 ...``) or per ``log`` call (``Step 12 | loss:0.53``).
A run that was killed and resumed has several files (``log_<unix time>.txt``, one per start), or
one file with its step count going backwards when two starts fell in the same second. They are
read in order of start and merged so that the curve has each step once:

- a torn last line (the process was killed mid-write: no newline) is dropped, never half-parsed;
- when the step goes back (a resume from an earlier checkpoint, or a fresh start into the same
  ``output_dir``), every point logged at that step or later is dropped before the new points go in,
  so the curve follows the run that continued (the same rule as TensorBoard's ``purge_step``);
- a step logged again (validation at the step of the last training log) keeps the last value.

Figures (``run_dir/plots/*.png``, written atomically, 1200 x 750 px):

- ``loss.png``: every key containing ``loss``; keys starting with ``val`` are validation (markers);
- ``lr.png``: ``lr`` and per-group keys (``lr/connector``, ``lr_encoder``, ...);
- ``grad_norm.png``: keys containing ``grad_norm``;
- ``throughput.png``: tokens/s or images/s (``tokens_per_second_per_gpu``, ``images_per_s``, ...);
- ``metrics.png``: every other numeric key, one panel each (retrieval recall, accuracy, ...).

Drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by the Agg canvas):
no pyplot state, no display needed, safe to call from a training process.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medtune.utils.errors import UserError

__all__ = [
    "FIGURE_PX",
    "RunLog",
    "curve_figures",
    "group_of",
    "plot_run",
    "plot_runs",
    "read_run",
]

#: width, height in pixels of every curve PNG (figsize in inches x DPI)
FIGURE_PX = (1200, 750)
_DPI = 100

# subplot margins in figure fractions, room for tick labels in sci notation and a legend
_MARGINS = {
    "single": dict(left=0.08, right=0.98, bottom=0.08, top=0.92),
    "metrics": dict(left=0.06, right=0.98, bottom=0.07, top=0.90, wspace=0.25, hspace=0.45),
}

_STEP = re.compile(r"^Step (-?\d+) \| (.*)$")
_STAMPED = re.compile(r"^log_(\d+)\.txt$")
# order of the figures; "metrics" takes what no other group claims
GROUPS = ("loss", "lr", "grad_norm", "throughput", "metrics")
_TITLES = {
    "loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm (before clipping)",
    "throughput": "throughput",
    "metrics": "other logged metrics",
}


@dataclass
class RunLog:
    """The merged metric log of one run.

    Attributes:
        name: label of the run in legends (the run folder's name).
        series: metric name -> {step: value}, each step once.
        files: the log files read, in the order they were merged.
    """

    name: str
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, sorted by step."""
        pts = sorted(self.series.get(key, {}).items())
        return [s for s, _ in pts], [v for _, v in pts]


def group_of(key: str) -> str:
    """Which figure a metric key belongs to (see the module docstring)."""
    k = key.lower()
    if "loss" in k:
        return "loss"
    if k == "lr" or re.match(r"^lr[/_.\-]", k) or k.startswith("learning_rate"):
        return "lr"
    if "grad_norm" in k:
        return "grad_norm"
    if re.search(r"_per_s(ec(ond)?)?(_|$)", k) or "throughput" in k:
        return "throughput"
    return "metrics"


def _parse_value(text: str) -> float | None:
    """A logged scalar as float: ``0.5``, ``1e-05``, ``nan``, or a 0-d tensor's ``tensor(0.5)``."""
    t = text.strip()
    if t.startswith("tensor(") and t.endswith(")"):
        t = t[len("tensor(") : -1].split(",")[0]
    try:
        return float(t)
    except ValueError:
        return None


def _parse_payload(text: str) -> dict[str, float]:
    """``loss:0.5 lr:1e-05 `` -> {loss: 0.5, lr: 1e-05}; non-numeric values are not curves."""
    out: dict[str, float] = {}
    for token in text.split():
        name, sep, value = token.partition(":")
        if not sep or not name:
            continue
        v = _parse_value(value)
        if v is not None:
            out[name] = v
    return out


def _log_files(log_dir: Path) -> list[Path]:
    """DiskLogger files in the order the runs started: by the unix time in ``log_<t>.txt``."""

    def key(p: Path):
        m = _STAMPED.match(p.name)
        start = int(m.group(1)) if m else int(p.stat().st_mtime)
        return (start, p.name)

    return sorted((p for p in log_dir.glob("*.txt") if p.is_file()), key=key)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of the complete lines of one log; a torn last line is skipped."""
    text = path.read_text("utf-8", errors="replace")
    lines = text.split("\n")
    # text ending in "\n" leaves "" last; anything else last was cut mid-write
    yield from enumerate(lines[:-1], 1)


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunLog:
    """Read and merge every DiskLogger file under ``run_dir/logs``.

    Args:
        run_dir: a training run's ``output_dir``.
        name: legend label; default the folder's name.

    Returns:
        The merged :class:`RunLog` (each step once; see the module docstring for the rules).

    Raises:
        UserError: ``run_dir/logs`` is missing or holds no ``*.txt`` log.
    """
    run_dir = Path(run_dir)
    log_dir = run_dir / "logs"
    if not log_dir.is_dir():
        raise UserError(
            f"{log_dir}: no metric log folder (expected torchtune DiskLogger files written with "
            "metric_logger.log_dir=${output_dir}/logs)"
        )
    files = _log_files(log_dir)
    if not files:
        raise UserError(f"{log_dir}: no DiskLogger log file (*.txt) in it")
    run = RunLog(name=name or run_dir.resolve().name, files=files)
    last = -math.inf  # highest step seen so far, over every metric
    for path in files:
        for _, line in _lines(path):
            m = _STEP.match(line.strip())
            if not m:
                continue  # DiskLogger writes only "Step ..." lines; anything else is not a metric
            step = int(m.group(1))
            values = _parse_payload(m.group(2))
            if not values:
                continue
            if step < last:
                # the run went back (resume from a checkpoint or a new start): what was logged from
                # here on belongs to the abandoned timeline
                for pts in run.series.values():
                    for s in [s for s in pts if s >= step]:
                        del pts[s]
                last = step
            last = max(last, step)
            for k, v in values.items():
                run.series.setdefault(k, {})[step] = v
    run.series = {k: v for k, v in run.series.items() if v}
    return run


def curve_figures(runs: Sequence[RunLog]) -> dict:
    """Build one matplotlib Figure per metric group that has data.

    Args:
        runs: merged logs; several runs share axes (one colour per run, one line style per key).

    Returns:
        {group name: matplotlib.figure.Figure}; each line's x data are the logged steps and its y
        data the logged values, labelled ``key`` (one run) or ``run: key`` (several).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys_by_group: dict[str, list[str]] = {g: [] for g in GROUPS}
    for run in runs:
        for k in run.series:
            g = group_of(k)
            if k not in keys_by_group[g]:
                keys_by_group[g].append(k)
    all_steps = [s for run in runs for pts in run.series.values() for s in pts]
    # every panel spans the whole run, so a metric logged once per epoch sits where it happened
    lo, hi = (min(all_steps), max(all_steps)) if all_steps else (0, 1)
    pad = max(0.5, 0.02 * (hi - lo))
    w, h = FIGURE_PX
    figs = {}
    colors = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    for group, keys in keys_by_group.items():
        if not keys:
            continue
        keys = sorted(keys, key=lambda k: (k.lower().startswith("val"), k))
        fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
        if group == "metrics":
            # different scales (recall in %, accuracy in [0, 1], counts): a panel per key
            n = len(keys)
            cols = min(3, n)
            rows = math.ceil(n / cols)
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            for ax in axes[n:]:
                ax.set_visible(False)
            panels = list(zip(keys, axes[:n]))
        else:
            ax = fig.subplots()
            panels = [(k, ax) for k in keys]
        for i_key, (key, ax) in enumerate(panels):
            for i_run, run in enumerate(runs):
                xs, ys = run.points(key)
                if not xs:
                    continue
                label = key if len(runs) == 1 else f"{run.name}: {key}"
                val = key.lower().startswith("val") or len(xs) <= 20
                ax.plot(
                    xs,
                    ys,
                    # one run: a colour per key; several: a colour per run, a style per key
                    color=colors[(i_key if len(runs) == 1 else i_run) % len(colors)],
                    linestyle="-" if len(runs) == 1 else styles[i_key % len(styles)],
                    marker="o" if val else None,
                    markersize=4,
                    label=label,
                )
            ax.set_xlabel("step")
            ax.set_xlim(lo - pad, hi + pad)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if group == "metrics":
                ax.set_title(key, fontsize=10)
                if len(runs) > 1:
                    ax.legend(fontsize=7)
        if group != "metrics":
            ax.set_ylabel(_TITLES[group])
            ax.legend(fontsize=9)
            if group == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        fig.suptitle(_TITLES[group] + ("" if len(runs) > 1 else f" - {runs[0].name}"))
        # fixed margins, not tight_layout: tight_layout renders every axis once more to measure
        # it (a third of the time of each figure, paid at every epoch end of every run)
        fig.subplots_adjust(**_MARGINS["metrics" if group == "metrics" else "single"])
        figs[group] = fig
    return figs


def _save(fig, path: Path) -> None:
    """PNG written to a temp name then moved into place: a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    # zlib level 1: the PNG encoder was the largest single cost of a figure at the default level
    # (6); the file is ~30% larger, the pixels the same
    fig.savefig(tmp, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    os.replace(tmp, path)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Draw the curves of one or several runs on shared axes.

    Args:
        run_dirs: training ``output_dir`` folders (each with ``logs/``).
        out_dir: where the PNGs go (created).
        names: legend labels, one per run; default the folder names (made unique).

    Returns:
        The PNG paths written, in the order of ``GROUPS``.

    Raises:
        UserError: a run has no DiskLogger log.
    """
    if not run_dirs:
        raise UserError("plot: no run folder given")
    if names is None:
        names = _unique_names([Path(d) for d in run_dirs])
    runs = [read_run(d, n) for d, n in zip(run_dirs, names)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, fig in curve_figures(runs).items():
        path = out / f"{group}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    """Folder names, with parents added where two runs share a name (a/run vs b/run)."""
    resolved = [d.resolve() for d in dirs]
    depth = 1
    while depth < 6:
        names = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(r) for r in resolved]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write the training curves of one run into ``run_dir/plots/``.

    Args:
        run_dir: a training run's ``output_dir`` (its ``metric_logger`` wrote ``run_dir/logs``).

    Returns:
        The PNG paths written (``loss.png``, ``lr.png``, ... for the groups that have data); empty,
        with one line on stdout saying why, when the run logs to another tracker only
        (TensorBoard, W&B, MLflow draw their own curves) or logs nothing; empty when the
        environment sets ``MEDTUNE_PLOTS=0`` (sweeps of many short runs, CI: a redraw costs about
        a CPU-second, which is nothing next to a real epoch but most of a tiny one; ``medtune
        plot RUN_DIR`` draws the same figures later from the logs).
    """
    if os.environ.get("MEDTUNE_PLOTS", "1") == "0":
        return []
    log_dir = Path(run_dir) / "logs"
    if not log_dir.is_dir() or not _log_files(log_dir):
        print(
            f"plot: no DiskLogger log under {log_dir}: no curves drawn "
            "(metric_logger is another tracker, or none)"
        )
        return []
    return plot_runs([run_dir], Path(run_dir) / "plots")
