"""The quiet start: torchao's "Skipping import of cpp extensions" line is dropped, nothing else."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from medtune.utils import quiet


def test_the_silenced_message_is_torchaos_own():
    # the filter targets a line torchao really logs (if torchao rewords it, this fails)
    src = Path(importlib.util.find_spec("torchao").origin).read_text()
    assert "logger = logging.getLogger(__name__)" in src  # the "torchao" logger
    for name, prefix in quiet.NOISE:
        assert name == "torchao" and f'"{prefix}' in src


def test_only_that_record_is_dropped():
    quiet.install()
    quiet.install()  # idempotent
    logger = logging.getLogger("torchao")
    assert sum(isinstance(f, quiet._DropKnownNoise) for f in logger.filters) == 1

    def passes(msg: str) -> bool:
        rec = logger.makeRecord("torchao", logging.WARNING, __file__, 1, msg, (), None)
        return bool(logger.filter(rec))

    assert not passes("Skipping import of cpp extensions due to incompatible torch version 2.x")
    assert passes("Skipping import of something else")
    assert passes("a real torchao warning")


def test_a_medtune_process_starts_quiet_but_keeps_real_warnings():
    # a fresh process: importing medtune installs the filter; the record is logged as torchao's
    # __init__ logs it (importing torch here would cost seconds of CPU for the same check)
    code = (
        "import medtune, logging, warnings\n"
        "log = logging.getLogger('torchao')\n"
        "log.warning('Skipping import of cpp extensions due to incompatible torch version 2.14')\n"
        "log.warning('real torchao warning')\n"
        "warnings.warn('real python warning')\n"
    )
    err = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stderr
    assert "Skipping import of cpp extensions" not in err
    assert "real torchao warning" in err and "real python warning" in err
