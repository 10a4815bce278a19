"""Smoke tests: ``bench_packing.py --tiny`` and ``gpu_suite.sh --tiny`` (bench_gpu.py on CPU) run
end to end and print their ratio lines / table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_packing_tiny():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_packing.py"), "--tiny", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for name in ("padded", "grouped", "packed"):
        assert re.search(rf"^{name}\s+\d+ tok/s  \(\d+% padding", out, re.M), out
    assert re.search(r"^packed/padded = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^grouped/padded = \d+\.\d\dx$", out, re.M), out
    waste = {
        k: int(v)
        for k, v in re.findall(r"^(\w+): \d+ batches per epoch .*, (\d+)% padding", out, re.M)
    }
    # the point of both: less padding than plain batching, on the same samples
    assert waste["packed"] < waste["padded"] and waste["grouped"] < waste["padded"], waste


def test_gpu_suite_tiny_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    rows = (
        "vision padded",
        "vision grouped",
        "vision packed",
        "vision packed+compile",
        "lora padded",
        "generate b1",
        "generate b8",
        "generate b32",
    )
    table = out[re.search(r"^row\s+tokens/s", out, re.M).start() : out.index("\ntotal ")]
    for row in rows:
        # a number of tokens/s per row, no error row
        assert re.search(rf"^{re.escape(row)}\s+\d+\s+[\d.]+\s+n/a", table, re.M), table
    results = json.loads(next(tmp_path.glob("gpu_suite_*.json")).read_text())
    assert set(results) == set(rows)
    for row in rows:
        assert results[row]["tokens_per_s"] > 0
    for row in rows[:5]:  # training rows: finite loss near ln(vocab) for random weights
        assert 5.0 < results[row]["loss"] < 7.5 and results[row]["flops_per_step"] > 0
    log = next(tmp_path.glob("gpu_suite_*.txt")).read_text()
    assert table in log  # the log holds the printed table
