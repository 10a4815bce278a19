"""Smoke test: ``benchmarks/bench_generate.py --tiny`` runs, prints every ratio line, and each of
its token-for-token checks holds (batched == per-sample, cache == no cache, beams batched ==
per-sample, medtune == HF Llava greedy at batch 1 and 8, medtune's beam search == HF's). It runs
in this process (see conftest.py)."""

from __future__ import annotations

import re
import time

RATIOS = [
    r"batched/per-sample throughput",
    r"kv-cache/no-cache speed at \d+ new tokens",
    r"beam search \(4 beams\) batched/per-sample throughput",
    r"medtune/hf_llava throughput at batch 1",
    r"medtune/hf_llava throughput at batch 8",
    r"llama2-shaped batched/per-sample throughput",
    r"qwen2_5-shaped batched/per-sample throughput",
]


def test_bench_generate_tiny(run_bench):
    t0 = time.perf_counter()
    out = run_bench("bench_generate.py", "--tiny", "--threads", "1")
    elapsed = time.perf_counter() - t0
    for ratio in RATIOS:
        assert re.search(rf"^{ratio} = \d+\.\d\dx$", out, re.M), (ratio, out)
    same = re.findall(r"^same tokens: (\w+)$", out, re.M)
    assert same == ["True"] * 5, out  # the four batched/cache/beam/HF-greedy checks (HF twice)
    families = re.findall(r"^same tokens \((llama2|qwen2_5)\): (\w+)$", out, re.M)
    assert families == [("llama2", "True"), ("qwen2_5", "True")], out
    hf_beams = re.findall(r"same tokens as HF: (\w+)", out)
    assert hf_beams == ["True", "True"], out
    # a few s on an idle 2-core machine; the bound leaves room for a loaded one
    assert elapsed < 120, f"smoke run took {elapsed:.0f} s"
