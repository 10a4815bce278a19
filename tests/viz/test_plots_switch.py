"""``MEDTUNE_PLOTS=0`` skips the epoch-end redraw of :func:`medtune.viz.curves.plot_run`."""

from medtune.viz import curves


def _log(run):
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "log_1.txt").write_text("Step 1 | loss:1.0\nStep 2 | loss:0.5\n")


def test_plots_off_draws_nothing_and_on_draws(tmp_path, monkeypatch):
    _log(tmp_path)
    monkeypatch.setenv("MEDTUNE_PLOTS", "0")
    assert curves.plot_run(tmp_path) == [] and not (tmp_path / "plots").exists()
    monkeypatch.setenv("MEDTUNE_PLOTS", "1")
    assert [p.name for p in curves.plot_run(tmp_path)] == ["loss.png"]
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
