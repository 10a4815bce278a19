"""Config checks shared by every recipe: the known top-level keys."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from medtune.utils.errors import ConfigError


def check_keys(cfg: Any, known: Iterable[str], recipe: str) -> None:
    """Refuse top-level config keys the recipe does not read (a typo would be ignored silently).

    Args:
        cfg: the run's config (a mapping).
        known: the keys the recipe reads.
        recipe: the recipe's name, for the message.

    Raises:
        ConfigError: ``config key(s) not known to <recipe>: epochz (did you mean 'epochs'?)``.
    """
    known = set(known)
    unknown = sorted(set(cfg.keys()) - known)
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(known), n=1)
        if close:
            hints.append(f"'{k}' -> '{close[0]}'?")
    hint = f" (did you mean {', '.join(hints)})" if hints else ""
    raise ConfigError(
        f"config key(s) not known to {recipe}: {', '.join(unknown)}{hint}; "
        f"known: {', '.join(sorted(known))}"
    )


def optional_component(cfg: Any, key: str) -> Any:
    """The component config at ``key``, or None when it is absent, null, or was switched off on
    the command line (``val_dataset=null`` over a node with a ``_component_`` leaves
    ``{_component_: None, ...}``: torchtune's override parser sets the component, not the node)."""
    node = cfg.get(key) if hasattr(cfg, "get") else None
    if not node or not hasattr(node, "get") or node.get("_component_") is None:
        return None
    return node
