"""``medtune plot``: curves of several runs on shared axes, through the CLI entry point."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchtune.training.metric_logging import DiskLogger

from medtune._cli.main import main


def _log(run_dir, offset):
    lg = DiskLogger(log_dir=str(run_dir / "logs"), filename="log_1.txt")
    for s in range(1, 6):
        lg.log_dict({"loss": 1.0 / s + offset, "lr": 1e-3}, step=s)
    lg.log_dict({"val_loss": 0.5 + offset}, step=5)
    lg.close()


def test_plot_two_runs_to_a_folder(tmp_path, capsys):
    a, b = tmp_path / "image", tmp_path / "blank"
    _log(a, 0.0)
    _log(b, 0.3)
    capsys.readouterr()  # DiskLogger's "Writing logs to" lines
    out = tmp_path / "cmp"
    assert main(["plot", str(a), str(b), "--out", str(out), "--name", "A", "--name", "B"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "loss.png"), str(out / "lr.png")]
    img = np.asarray(Image.open(out / "loss.png").convert("RGB"))
    assert img.shape == (750, 1200, 3) and (img < 250).any(axis=-1).mean() > 0.01


def test_plot_one_run_defaults_to_its_plots_folder(tmp_path, capsys):
    _log(tmp_path, 0.0)
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "loss.png").is_file()


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medtune: error: run folder not found: {tmp_path / 'nope'}"]
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metric log folder" in err[0]
