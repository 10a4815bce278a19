"""Smoke test: ``benchmarks/bench_vision_finetune.py --tiny --steps 2`` runs and prints its ratio lines."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vision_finetune.py"


def test_bench_vision_finetune_tiny():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--warmup", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^medtune/hf_llava = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^medtune/bare = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^medtune/medtune_all_logits = \d+\.\d\dx", out, re.M), out
    for name in ("medtune", "hf_llava", "bare", "medtune_all_logits"):
        assert re.search(rf"^{name}\s+[\d.]+ ms/step", out, re.M), out
    assert "same function" in out, out  # equal step-0 loss from equal weights
    assert "torch.set_num_threads(1)" in out, out
    # < 30 s on an idle 2-core machine (mostly imports); the bound here leaves room for a loaded one
    assert elapsed < 120, f"smoke run took {elapsed:.0f} s"
