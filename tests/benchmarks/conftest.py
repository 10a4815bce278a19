"""Run a ``benchmarks/`` script in this process (the smoke tests).

A fresh interpreter per benchmark pays 10-15 CPU-seconds of imports (torch, open_clip, transformers)
before a tiny benchmark does a second of work; the smoke tests check what the scripts compute and
print, not how Python starts, so they run the script's ``__main__`` here with ``sys.argv`` patched.
The global state a script changes (torch's thread count, the global RNGs, ``sys.path``) is put
back afterwards so later tests in this worker see what they would have seen.
"""

from __future__ import annotations

import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def run_bench(capsys, monkeypatch):
    """``run_bench("bench_x.py", *argv) -> stdout``: the script as ``python bench_x.py *argv``
    would run it (``__name__ == "__main__"``), a non-zero ``SystemExit`` re-raised."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    monkeypatch.syspath_prepend(str(BENCH))  # also undoes the scripts' own sys.path inserts

    def run(script: str, *argv: str) -> str:
        path = BENCH / script
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        capsys.readouterr()
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                out = capsys.readouterr()
                tail = out.out[-3000:] + out.err[-3000:]
                raise AssertionError(f"{script} exited {e.code}:\n{tail}") from e
        return capsys.readouterr().out

    yield run
    torch.set_num_threads(threads)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
