"""Smoke run of ``benchmarks/bench_serve.py`` (few requests): no request lost, answers equal."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"


def test_bench_serve_small(tiny_assets, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    status = main(
        ["--requests", "8", "--clients", "4", "--max-tokens", "4", "--assets", str(tiny_assets)]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "lost requests: 0; batched answers different from one-at-a-time: 0" in out
    assert re.search(r"^batched/one_at_a_time requests/s = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^batched/one_at_a_time p95 latency = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"batches \d+ \(largest [2-4]\)", out), out  # the batched run did batch
