"""Key maps for weights released by other projects: one small module per source.

Each source module (``blip``, ``mavl``, ``lavis_blip2``, ``minigpt4``, ``medcap``, ``hf_llava``, ...)
is the only place that knows that project's parameter names. It turns the foreign state dict into
medtune's names with :func:`apply_key_map`, which refuses, by name, every foreign key that the map
leaves over, every medtune key that nothing fills, and every shape that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from medtune.utils.errors import UserError

# How many names an error lists before it says "and N more".
_SHOW = 8


class KeyMapError(UserError, ValueError):
    """A foreign checkpoint does not fit the key map (leftover, missing or mis-shaped keys)."""


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def read_foreign_checkpoint(path: str | Path, *, keys: tuple[str, ...] = ("model", "state_dict")):
    """Read a released checkpoint (``.pth``/``.pt``/``.bin`` under ``weights_only=True``, or
    ``.safetensors``) and return its flat tensor dict.

    Args:
        path: the file.
        keys: wrapper keys tried in order when the file holds a dict of dicts (``{"model": ...}``).

    Returns:
        ``{name: tensor}`` as the authors saved it (prefixes such as ``module.`` kept).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for k in keys:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"{path}: expected a state dict of tensors (optionally under one of {list(keys)})"
        )
    return dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Drop ``prefix`` from every key that has it (DDP's ``module.``)."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state.items()}


def apply_key_map(
    state: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source: str,
    ignore: Callable[[str], bool] = lambda k: False,
) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict into medtune's names and check it against the target.

    Args:
        state: the foreign ``{name: tensor}``.
        rename: foreign name -> medtune name, or None when the map does not know the key.
        expected: medtune name -> shape of every tensor the target needs (e.g. from
            ``{k: v.shape for k, v in model.state_dict().items()}``).
        source: what is being loaded, for messages (``"BLIP model_base.pth"``).
        ignore: foreign keys dropped on purpose (optimizer state, heads medtune does not build);
            say why at the call site.

    Returns:
        ``{medtune name: tensor}`` holding exactly the keys of ``expected``.

    Raises:
        KeyMapError: naming the leftover foreign keys, the missing medtune keys, or a shape that
            differs (with both shapes).
    """
    out: dict[str, torch.Tensor] = {}
    leftover = []
    for k, v in state.items():
        if ignore(k):
            continue
        new = rename(k)
        if new is None or new not in expected:
            leftover.append(k if new is None else f"{k} (-> {new})")
            continue
        if new in out:
            raise KeyMapError(f"{source}: two keys map to {new}")
        out[new] = v
    if leftover:
        raise KeyMapError(f"{source}: keys the map does not place: {_names(leftover)}")
    missing = set(expected) - set(out)
    if missing:
        raise KeyMapError(f"{source}: missing keys for {_names(missing)}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise KeyMapError(
                f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k])}"
            )
    return out
