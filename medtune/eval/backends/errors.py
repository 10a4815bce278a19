"""The error of a backend spec, in its own module so that backends can raise it without importing
the package that imports them (``backends/__init__`` <-> ``backends/hf`` was an import cycle)."""

from __future__ import annotations

from medtune.utils.errors import ConfigError


class BackendConfigError(ConfigError):
    """A backend spec that cannot work; the message names the checkpoint entry and the key."""
