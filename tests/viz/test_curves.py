"""Training curves: logs written by torchtune's own DiskLogger, read back, merged and drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from torchtune.training.metric_logging import DiskLogger

from medtune.utils.errors import UserError
from medtune.viz import curves


def _write(log_dir, name, rows, torn_tail=None):
    """rows: [(step, {key: value})] through DiskLogger.log_dict; torn_tail: text without newline."""
    lg = DiskLogger(log_dir=str(log_dir), filename=name)
    for step, payload in rows:
        lg.log_dict(payload, step=step)
    lg.close()
    if torn_tail is not None:
        with open(log_dir / name, "a") as f:
            f.write(torn_tail)


def _train_rows(steps, offset=0.0):
    return [
        (
            s,
            {
                "loss": 2.0 / s + offset,
                "lr": 1e-4 * s,
                "lr/connector": 2e-4 * s,
                "tokens_per_second_per_gpu": 100.0 + s,
                "grad_norm": 0.5 * s,
            },
        )
        for s in steps
    ]


def _line_data(fig):
    """{label: (xs, ys)} of every line in a figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out[line.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


def _check_png(path):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (curves.FIGURE_PX[1], curves.FIGURE_PX[0])
    # a white page with a few lines: many non-white pixels and several colours are drawn
    non_white = (img < 250).any(axis=-1).mean()
    assert 0.01 < non_white < 0.6, (path, non_white)
    # distinct colours, each RGB packed into one integer (np.unique(axis=0) on the rows sorts
    # them as void records: ~3 s per image, against milliseconds for the same count here)
    rgb = img.astype(np.uint32)
    assert len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])) > 20


def test_plot_run_plots_the_logged_points(tmp_path):
    log_dir = tmp_path / "logs"
    rows = _train_rows(range(1, 11))
    rows.append((10, {"val_loss": 0.7}))
    rows.append((20, {"val_loss": 0.6, "val_r1": 55.0}))
    _write(log_dir, "log_100.txt", rows)

    run = curves.read_run(tmp_path)
    assert run.points("loss") == (list(range(1, 11)), [2.0 / s for s in range(1, 11)])
    assert run.points("val_loss") == ([10, 20], [0.7, 0.6])

    figs = curves.curve_figures([run])
    assert set(figs) == {"loss", "lr", "grad_norm", "throughput", "metrics"}
    loss = _line_data(figs["loss"])
    assert loss["loss"] == run.points("loss")
    assert loss["val_loss"] == ([10, 20], [0.7, 0.6])
    lr = _line_data(figs["lr"])
    assert lr["lr"][1] == [1e-4 * s for s in range(1, 11)]
    assert lr["lr/connector"][1] == [2e-4 * s for s in range(1, 11)]
    assert _line_data(figs["grad_norm"])["grad_norm"][1] == [0.5 * s for s in range(1, 11)]
    assert _line_data(figs["throughput"])["tokens_per_second_per_gpu"][0] == list(range(1, 11))
    assert _line_data(figs["metrics"])["val_r1"] == ([20], [55.0])

    paths = curves.plot_run(tmp_path)
    assert [p.name for p in paths] == [
        "loss.png",
        "lr.png",
        "grad_norm.png",
        "throughput.png",
        "metrics.png",
    ]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    for p in paths:
        _check_png(p)
    assert not list((tmp_path / "plots").glob(".*tmp"))


def test_killed_and_resumed_run_has_each_step_once(tmp_path):
    log_dir = tmp_path / "logs"
    # first start: steps 1..7 then killed mid-line; the checkpoint was at step 4
    _write(log_dir, "log_100.txt", _train_rows(range(1, 8)), torn_tail="Step 8 | loss:0.2")
    # second start resumes from step 4: steps 5..12, with slightly different values
    _write(log_dir, "log_200.txt", _train_rows(range(5, 13), offset=1.0))
    run = curves.read_run(tmp_path)
    steps, values = run.points("loss")
    assert steps == list(range(1, 13))  # none missing, none twice, the torn step 8 not half-read
    assert values == [2.0 / s for s in range(1, 5)] + [2.0 / s + 1.0 for s in range(5, 13)]
    drawn = _line_data(curves.curve_figures([run])["loss"])["loss"]
    assert drawn == (steps, values)


def test_restart_within_one_file_and_file_order(tmp_path):
    log_dir = tmp_path / "logs"
    # two starts in the same second append to one file: the step goes back from 6 to 3
    _write(log_dir, "log_300.txt", _train_rows(range(1, 7)) + _train_rows(range(3, 9), offset=5))
    # an older start (by the time in its name) is read first whatever the directory order
    _write(log_dir, "log_20.txt", _train_rows(range(1, 4), offset=9))
    steps, values = curves.read_run(tmp_path).points("loss")
    assert steps == list(range(1, 9))
    assert values == [2.0 / s for s in (1, 2)] + [2.0 / s + 5 for s in range(3, 9)]


def test_several_runs_share_axes(tmp_path):
    a, b = tmp_path / "demo", tmp_path / "demo_blank"
    _write(a / "logs", "log_1.txt", _train_rows(range(1, 6)))
    _write(b / "logs", "log_1.txt", _train_rows(range(1, 6), offset=0.5))
    out = tmp_path / "cmp"
    paths = curves.plot_runs([a, b], out)
    assert {p.name for p in paths} == {"loss.png", "lr.png", "grad_norm.png", "throughput.png"}
    figs = curves.curve_figures([curves.read_run(a), curves.read_run(b)])
    loss = _line_data(figs["loss"])
    assert loss["demo: loss"][1] == [2.0 / s for s in range(1, 6)]
    assert loss["demo_blank: loss"][1] == [2.0 / s + 0.5 for s in range(1, 6)]
    assert len(figs["loss"].axes) == 1  # shared axes
    _check_png(out / "loss.png")


def test_missing_logs_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(UserError, match="logs: no metric log folder"):
        curves.read_run(tmp_path)
    (tmp_path / "logs").mkdir()
    with pytest.raises(UserError, match=r"no DiskLogger log file"):
        curves.plot_runs([tmp_path], tmp_path / "out")
    # in a training run logging to another tracker only, plot_run says so and draws nothing
    assert curves.plot_run(tmp_path) == []
    assert "no DiskLogger log under" in capsys.readouterr().out


def test_values_parse_like_torchtune_writes_them():
    assert curves._parse_payload("loss:0.5 lr:1e-05 acc:tensor(0.25) name:abc ") == {
        "loss": 0.5,
        "lr": 1e-05,
        "acc": 0.25,
    }
    assert math.isnan(curves._parse_payload("loss:nan")["loss"])
    assert curves.group_of("lr_encoder") == "lr" and curves.group_of("lrx") == "metrics"
    assert curves.group_of("images_per_second") == "throughput"
    assert curves.group_of("images_per_s") == "throughput"
    assert curves.group_of("tokens_per_step") == "metrics"
