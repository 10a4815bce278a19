"""Smoke test: ``benchmarks/bench_contrastive.py --tiny`` at a tiny size runs and prints its ratio lines.

It runs in this process (see conftest.py). Its two gloo workers are real processes, forked from
this one instead of spawned: a spawned worker re-imports torch, open_clip and medtune (~10 CPU-s
each) to run one tiny step; what it runs and measures is the same. Forking is safe here: each
worker sets one thread before any op (no OpenMP pool of the parent's is used) and opens its own
process group.
"""

from __future__ import annotations

import re
import resource

import torch.multiprocessing


def _cpu() -> float:
    return sum(resource.getrusage(r).ru_utime + resource.getrusage(r).ru_stime
               for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip


def test_bench_contrastive_tiny(run_bench, monkeypatch):
    get_context = torch.multiprocessing.get_context
    asked = []

    def fork_context(method=None):
        asked.append(method)
        return get_context("fork")

    monkeypatch.setattr(torch.multiprocessing, "get_context", fork_context)
    cpu0 = _cpu()
    argv = ["--tiny", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--n-images", "60",
            "--captions-per-image", "5"]  # fmt: skip
    out = run_bench("bench_contrastive.py", *argv)
    assert asked == ["spawn"]  # the one place the script starts processes
    # user + system time of the script and its 2 gloo workers (it joins them before exiting)
    cpu = _cpu() - cpu0
    assert "torch.set_num_threads(1); batch B=4" in out, out
    for name in ("local", "single_2B", "gather"):
        assert re.search(rf"^{name}\s.*\s\d+\.\d images/s", out, re.M), out
    for ratio in ("gather/local", "gather/single_2B", "naive/itm_eval"):
        assert re.search(rf"^{re.escape(ratio)} = \d+\.\d\dx$", out, re.M), out
    # BLIP's step (ITC+ITM+LM) next to the CLIP-style one, and BLIP's re-ranked evaluation
    assert re.search(r"^blip\s.*\s\d+\.\d images/s", out, re.M), out
    assert re.search(r"^blip/local = \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^rerank 20 x 100 k_test 8: \d+\.\d\d s \(960 ITM pairs", out, re.M), out
    assert re.search(r"^rerank/k_test_1 = \d+\.\d\dx$", out, re.M), out
    # the step's model: 1 of 4 shards of the rows measured (6 + 26 rows x 8), extrapolated
    assert re.search(
        r"^rerank_step_model 20 x 100 k_test 8, rows of 1 of 4 shards: \d+\.\d\d s measured "
        r"\(256 ITM",
        out,
        re.M,
    ), out
    assert re.search(
        r"^rerank_step_model 20 x 100 k_test 8: EXTRAPOLATED \d+ s .*not measured", out, re.M
    ), out
    # the fast scorer and BLIP's argsort loop agree on R@1 at 60 x 300
    assert re.search(r"^retrieval 60 x 300: itm_eval .* \(R@1 equal: ", out, re.M), out
    # ~3 s of CPU on an idle 2-core machine (+5 s where open_clip is not yet imported)
    assert cpu < 60, f"smoke run took {cpu:.0f} s of CPU"
