"""Figures and pages: training curves, result charts, the error-analysis page.

- :mod:`medtune.viz.curves`: ``plot_run(run_dir)`` (training recipes, at each epoch end) and
  ``plot_runs`` (``medtune plot``);
- :mod:`medtune.viz.charts`: grouped bar charts of a results table, ROC curves per class;
- :mod:`medtune.viz.report`: ``report.html`` per checkpoint x dataset;
- :mod:`medtune.viz.eval_outputs`: everything above for one eval ``output_dir`` (the eval recipe).

Submodules import matplotlib lazily; importing this package costs nothing.
"""
