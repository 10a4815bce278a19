"""Config checks shared by every recipe: the known top-level keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from medtune.utils.errors import ConfigError, did_you_mean


def unknown_keys(cfg: Any, known: Iterable[str]) -> list[tuple[str, str]]:
    """The top-level keys of ``cfg`` that are not in ``known``, each with its close-match hint:
    ``[("epochz", " (did you mean 'epochs'?)")]``."""
    known = set(known)
    return [(k, did_you_mean(k, known)) for k in sorted(set(cfg.keys()) - known)]


def check_keys(cfg: Any, known: Iterable[str], recipe: str) -> None:
    """Refuse top-level config keys the recipe does not read (a typo would be ignored silently).

    Args:
        cfg: the run's config (a mapping).
        known: the keys the recipe reads.
        recipe: the recipe's name, for the message.

    Raises:
        ConfigError: ``config key(s) not known to <recipe>: epochz (did you mean 'epochs'?)``.
    """
    unknown = unknown_keys(cfg, known)
    if unknown:
        raise ConfigError(
            f"config key(s) not known to {recipe}: {', '.join(k + hint for k, hint in unknown)}; "
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
