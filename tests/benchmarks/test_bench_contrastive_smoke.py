"""Smoke test: ``benchmarks/bench_contrastive.py --tiny`` at a tiny size runs and prints its ratio lines.

It runs in this process (see conftest.py); its two gloo workers are real ``spawn`` processes."""

from __future__ import annotations

import re
import resource


def _cpu() -> float:
    return sum(resource.getrusage(r).ru_utime + resource.getrusage(r).ru_stime
               for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip


def test_bench_contrastive_tiny(run_bench):
    cpu0 = _cpu()
    argv = ["--tiny", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--n-images", "60",
            "--captions-per-image", "5"]  # fmt: skip
    # imported by name, not run as __main__: the spawned workers import _worker from it
    out = run_bench("bench_contrastive.py", *argv, module=True)
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
    # ~10 s of CPU on an idle 2-core machine, mostly importing open_clip in the 2 workers
    assert cpu < 60, f"smoke run took {cpu:.0f} s of CPU"
