"""Silence known import-time noise of the pinned stack, narrowly: one message, matched exactly.

torchao 0.15 logs, at import, ``Skipping import of cpp extensions due to incompatible torch
version ...`` (a WARNING on the ``torchao`` logger, shown by logging's last-resort handler): with
torch 2.14 its C++ kernels are not loaded, which medtune does not use (NF4 / QLoRA run on the
pure-PyTorch path). The line opened every command. :func:`install` adds a filter to that one
logger that drops records whose message starts with that text; every other torchao record, and
every Python warning, still shows.

Installed by ``medtune/__init__.py`` (before anything imports torchao), so it covers the CLI, the
recipes run by ``medtune run`` in-process, tools and tests. Import-light: ``logging`` only.
"""

from __future__ import annotations

import logging

__all__ = ["NOISE", "install"]

#: (logger name, message prefix) of every record dropped
NOISE = (("torchao", "Skipping import of cpp extensions"),)


class _DropKnownNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the filters (once per logger; calling again adds nothing)."""
    for name, prefix in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownNoise(prefix))
