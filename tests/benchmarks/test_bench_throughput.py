"""Smoke tests: ``bench_packing.py --tiny`` and ``gpu_suite.sh --tiny`` (bench_gpu.py on CPU) run
end to end and print their ratio lines / table.

The Python scripts run in this process (see conftest.py). ``gpu_suite.sh`` runs for real, with
``PYTHON`` pointing at a recorder that stands in for the interpreter: the shell's part (the exact
``bench_gpu.py`` command, the log it tees, the exit status it passes on) is checked on that, and the
very command it built then runs here, writing the JSON where the shell asked for it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_packing_tiny(run_bench):
    out = run_bench("bench_packing.py", "--tiny", "--threads", "1")
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


RECORDER = """#!/usr/bin/env bash
# stands in for python: records its working folder and arguments, prints a canned table
pwd > "$RECORD"
for a in "$@"; do printf '%s\\n' "$a"; done >> "$RECORD"
printf 'row    tokens/s\\nrecorded %s\\ntotal 0 s\\n' "$#"
exit "${RECORDED_STATUS:-0}"
"""


def test_gpu_suite_tiny_on_cpu(tmp_path, run_bench):
    py = tmp_path / "python"
    py.write_text(RECORDER)
    py.chmod(0o755)
    out_dir, record = tmp_path / "out", tmp_path / "argv.txt"
    env = {**os.environ, "PYTHON": str(py), "RECORD": str(record)}

    def suite(status, out):
        return subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--tiny"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "OUT": str(out), "RECORDED_STATUS": str(status)},
        )

    assert suite(3, tmp_path / "out3").returncode == 3  # the interpreter's status is the suite's
    proc = suite(0, out_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cwd, *argv = record.read_text().splitlines()
    assert Path(cwd) == ROOT  # relative script path below: the suite runs from the repo root
    assert argv[:4] == ["benchmarks/bench_gpu.py", "--budget-s", "420", "--json"], argv
    assert re.fullmatch(rf"{re.escape(str(out_dir))}/gpu_suite_\d{{8}}_\d{{6}}\.json", argv[4])
    assert argv[5:] == ["--tiny"], argv
    # the log, next to the JSON, holds what the interpreter printed; stdout adds the suite's line
    log = Path(argv[4]).with_suffix(".txt")
    printed = "row    tokens/s\nrecorded 6\ntotal 0 s\n"
    assert log.read_text() == printed
    assert proc.stdout == f"{printed}gpu_suite: log {log} (exit 0)\n", proc.stdout

    # the command the suite built, here: bench_gpu.py's table and JSON
    out = run_bench(Path(argv[0]).name, *argv[1:])
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
    results = json.loads(Path(argv[4]).read_text())
    assert set(results) == set(rows)
    for row in rows:
        assert results[row]["tokens_per_s"] > 0
    for row in rows[:5]:  # training rows: finite loss near ln(vocab) for random weights
        assert 5.0 < results[row]["loss"] < 7.5 and results[row]["flops_per_step"] > 0
    assert table in out  # the printed table
