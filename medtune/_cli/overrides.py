"""``medtune run`` overrides: ``key=value`` / ``+key=value`` / ``~key`` checked against the YAML
before the recipe starts (an unknown key gets a did-you-mean line), then handed to torchtune's
parser. Used by :mod:`medtune._cli.run` (which re-exports :func:`check_overrides`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._errors import CLIError, did_you_mean

__all__ = ["check_overrides"]

_SEGMENT = re.compile(r"([^\[\]\s=~+]+)((?:\[\d+\])*)")
_MISSING = object()


def _key_parts(key: str) -> list[str | int] | None:
    """``"a.b[0].c"`` -> ``["a", "b", 0, "c"]``; None when malformed."""
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            return None
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return parts


def _lookup(root: Any, parts: list[str | int]) -> tuple[Any, bool]:
    """Walk ``parts`` from ``root``; return (node or _MISSING, whether a list was traversed)."""
    node, through_list = root, False
    for part in parts:
        if isinstance(node, dict):
            if part in node:
                node = node[part]
            elif isinstance(part, str) and part.isdigit() and int(part) in node:
                node = node[int(part)]
            else:
                return _MISSING, through_list
        elif isinstance(node, list):
            through_list = True
            index = part if isinstance(part, int) else int(part) if part.isdigit() else -1
            if not 0 <= index < len(node):
                return _MISSING, through_list
            node = node[index]
        else:
            return _MISSING, through_list
    return node, through_list


def _list_key(root: Any, parts: list[str | int]) -> str:
    """The dotted key of the first list on the path ``parts`` (``checkpointer.checkpoint_files``)."""
    node, keys = root, []
    for part in parts:
        if isinstance(node, list):
            break
        keys.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(keys)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            keys.append(key)
            keys.extend(_all_keys(v, key))
    return keys


def check_overrides(overrides: list[str], cfg_path: Path) -> list[str]:
    """Validate overrides against the YAML and return them as torchtune's parser takes them.

    Args:
        overrides: ``key=value``, ``+key=value`` or ``~key`` strings.
        cfg_path: the YAML they apply to.

    Returns:
        The overrides with the ``+`` of added keys stripped.

    Raises:
        CLIError: the first malformed override, unknown key, list element or unsupported value.
    """
    if not overrides:
        return []
    from omegaconf import OmegaConf

    from .validate import load_config

    root = OmegaConf.to_container(load_config(cfg_path), resolve=False)
    shapes = "expected key=value, +key=value (add a key) or ~key (remove a key)"
    out = []
    for tok in overrides:
        if tok.startswith("~"):
            key, value, adding = tok[1:], None, False
            if "=" in key:
                raise CLIError(f"malformed override '{tok}': ~key removes a key and takes no value")
        else:
            adding = tok.startswith("+")
            body = tok[1:] if adding else tok
            key, sep, value = body.partition("=")
            if not sep:
                raise CLIError(f"malformed override '{tok}': {shapes}")
            if "=" in value:
                raise CLIError(
                    f"override '{tok}': a value cannot contain '=' "
                    "(torchtune's parser splits overrides on every '='); put it in a copied config"
                )
        parts = _key_parts(key)
        if not key or parts is None:
            raise CLIError(f"malformed override '{tok}': {shapes}")
        node, through_list = _lookup(root, parts)
        if through_list:
            raise CLIError(
                f"override '{tok}': cannot change an element inside a list ('{key}'); torchtune "
                "merges overrides as mappings. Override the whole list "
                f"({_list_key(root, parts)}='[...]') or edit a copy of the config (`medtune cp`)"
            )
        hint = did_you_mean(key, _all_keys(root))
        if tok.startswith("~"):
            if node is _MISSING:
                raise CLIError(
                    f"cannot remove '{key}': config {cfg_path.name} has no such key{hint}"
                )
            if "_component_" in parts or (isinstance(node, dict) and "_component_" in node):
                raise CLIError(f"cannot remove '{key}': torchtune cannot remove a component")
            out.append(tok)
        elif adding:
            out.append(tok[1:])
        else:
            if node is _MISSING:
                raise CLIError(
                    f"override '{tok}': config {cfg_path.name} has no key '{key}'{hint}; "
                    f"to add it, write '+{tok}'"
                )
            out.append(tok)
    return out
