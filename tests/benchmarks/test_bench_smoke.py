"""Smoke test: ``benchmarks/bench_vision_finetune.py --tiny --steps 2`` runs (in this process, see
conftest.py) and prints its ratio lines."""

from __future__ import annotations

import re
import time


def test_bench_vision_finetune_tiny(run_bench):
    t0 = time.perf_counter()
    argv = ["--tiny", "--steps", "2", "--warmup", "1", "--threads", "1"]
    out = run_bench("bench_vision_finetune.py", *argv)
    elapsed = time.perf_counter() - t0
    assert re.search(r"^medtune/hf_llava = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^medtune/bare = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^medtune/medtune_all_logits = \d+\.\d\dx", out, re.M), out
    for name in ("medtune", "hf_llava", "bare", "medtune_all_logits"):
        assert re.search(rf"^{name}\s+[\d.]+ ms/step", out, re.M), out
    assert "same function" in out, out  # equal step-0 loss from equal weights
    assert "torch.set_num_threads(1)" in out, out
    # a few s on an idle 2-core machine; the bound here leaves room for a loaded one
    assert elapsed < 120, f"smoke run took {elapsed:.0f} s"
