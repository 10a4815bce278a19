"""Smoke test: ``benchmarks/bench_mavl.py --tiny`` runs in this process and reports its numbers."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mavl.py"


def test_bench_mavl_tiny(capsys):
    res = runpy.run_path(str(SCRIPT))["main"](["--tiny", "--steps", "1", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert (
        "pretrain step (fwd + loss + bwd + AdamW):" in out
        and "decoder share of forward time" in out
    )
    assert res["pretrain_images_per_s"] > 0 and res["zero_shot_images_per_s"] > 0
    assert 0 < res["decoder_share_pretrain_forward"] < 1 and 0 < res["decoder_share_zero_shot"] < 1
