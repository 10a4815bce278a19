"""Library errors that stand for a user error, translated to one line (see ``errors.describe``).

Types are matched by module and name so that nothing here imports torch, yaml or omegaconf. Where a
library's message lacks the file or the config key, it is read from the traceback: the innermost
frame's local that names the file, and the omegaconf node torchtune's ``instantiate`` was building.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

__all__ = ["translate"]


def translate(exc: BaseException) -> str | None:
    """One line for a user error (a :class:`UserError` or a library error standing for one, also
    when re-raised from a DataLoader worker); None for a bug."""
    worker = _unwrap_worker(exc)
    if worker is not None:
        return worker
    if _is_user_error(type(exc)):
        return _one_line(str(exc))
    for fn in _TRANSLATORS:
        message = fn(exc)
        if message is not None:
            return _one_line(message)
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _is(exc: BaseException, module: str, name: str) -> bool:
    """``exc`` is an instance of ``module.name`` (matched by name: no import of the library)."""
    return any(c.__name__ == name and c.__module__.startswith(module) for c in type(exc).__mro__)


def _is_user_error(cls: type) -> bool:
    """``cls`` is medtune's ``UserError`` or a subclass (by name: this module is imported by
    :mod:`medtune.utils.errors`, which defines it, so it does not import it back)."""
    return any(
        c.__name__ == "UserError" and c.__module__ == "medtune.utils.errors" for c in cls.__mro__
    )


def _frames(exc: BaseException) -> list[tuple[str, str, dict]]:
    """(file, function, locals) of each frame of ``exc``'s traceback, outermost first."""
    out, tb = [], exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        out.append((code.co_filename.replace(os.sep, "/"), code.co_name, tb.tb_frame.f_locals))
        tb = tb.tb_next
    return out


def _raised_in(exc: BaseException, path_part: str, functions: tuple[str, ...] = ()) -> bool:
    frames = _frames(exc)
    if not frames:
        return False
    file, func, _ = frames[-1]
    return path_part in file and (not functions or func in functions)


def _file_local(exc: BaseException, names=("filename", "f", "path", "checkpoint_path")) -> str:
    """The file a loader was reading, from the innermost frame that names one; or ``""``."""
    for _, _, local in reversed(_frames(exc)):
        for n in names:
            v = local.get(n)
            if isinstance(v, (str, os.PathLike)):
                return os.fspath(v)
    return ""


def _yaml(exc):
    if not _is(exc, "yaml", "YAMLError"):
        return None
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"YAML does not parse: {problem}"
    return f"{mark.name}: line {mark.line + 1} column {mark.column + 1}: YAML does not parse: {problem}"


def _omegaconf(exc):
    if not _is(exc, "omegaconf", "OmegaConfBaseException"):
        return None
    key = getattr(exc, "full_key", None)
    msg = getattr(exc, "msg", None) or str(exc).split("\n    full_key:")[0]
    msg = msg.strip().splitlines()[0]
    if _is(exc, "omegaconf", "ConfigAttributeError") or _is(exc, "omegaconf", "ConfigKeyError"):
        msg = f"missing from the config ({msg})"
    return f"{key}: {msg}" if key else f"config: {msg}"


def _node_key(exc) -> str:
    """The config key of the node that torchtune's ``instantiate`` was building, if known."""
    for file, func, local in reversed(_frames(exc)):
        if "torchtune/config/_instantiate.py" in file and func == "instantiate":
            node = local.get("config")
            try:
                return str(node._get_full_key(None))
            except Exception:  # not an omegaconf node (a plain dict): no key to name
                return ""
    return ""


def _torchtune_config(exc):
    if _is(exc, "torchtune.config", "InstantiationError"):
        key = _node_key(exc)
        match = re.match(r"Error loading '([^']*)'", str(exc))
        path = match.group(1) if match else None
        cause = exc.__cause__
        if path is None or cause is None:
            return f"{key + ': ' if key else ''}{exc}"
        why = str(cause)
        module, _, attr = path.rpartition(".")
        mod = sys.modules.get(module)
        if mod is not None and attr:
            names = [n for n in dir(mod) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=3)
            if close:
                why += "; did you mean " + " or ".join(f"'{module}.{c}'" for c in close) + "?"
        where = f"{key}._component_" if key else "_component_"
        return f"{where}: cannot import '{path}' ({why})"
    if _is(exc, "torchtune.config", "ConfigError"):
        errors = getattr(exc, "errors", [])
        return "config is not well-formed: " + "; ".join(
            f"{type(e).__name__}: {_one_line(str(e))}" for e in errors
        )
    if isinstance(exc, (ValueError, AssertionError)) and _raised_in(exc, "torchtune/config/"):
        return f"config: {exc}"
    if isinstance(exc, TypeError) and _raised_in(exc, "torchtune/config/_instantiate.py"):
        key = _node_key(exc)
        return f"{key + ': ' if key else ''}{exc}"
    return None


def _checkpoint(exc):
    if _is(exc, "safetensors", "SafetensorError"):
        f = _file_local(exc)
        return f"{f + ': ' if f else ''}not a readable safetensors file ({exc}; truncated or another format?)"
    if _is(exc, "pickle", "UnpicklingError") or _is(exc, "_pickle", "UnpicklingError"):
        if not _raised_in(exc, "torch/serialization.py"):
            return None
        text = str(exc)
        match = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        why = " ".join(match.group(1).split()) if match else text.splitlines()[0]
        f = _file_local(exc)
        return (
            f"{f + ': ' if f else ''}not a tensors-only checkpoint: torch.load(weights_only=True) "
            f"refused it ({why}); medtune never unpickles objects from a file"
        )
    serialization = isinstance(exc, RuntimeError) and _raised_in(exc, "torch/serialization.py")
    if serialization and "PytorchStreamReader" in str(exc):
        f = _file_local(exc)
        return f"{f + ': ' if f else ''}corrupt or truncated torch checkpoint ({str(exc).split('.')[0]})"
    if isinstance(exc, RuntimeError) and _raised_in(
        exc, "torch/nn/modules/module.py", ("load_state_dict",)
    ):
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        head = str(exc).splitlines()[0].rstrip(":")
        return f"checkpoint does not fit the model: {head}: {lines[0] if lines else ''}{more}"
    return None


def _os(exc):
    if not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    ):
        return None
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


_TRANSLATORS = (_yaml, _omegaconf, _torchtune_config, _checkpoint, _os)


_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def _unwrap_worker(exc: BaseException) -> str | None:
    """The original message of an error torch re-raised from a DataLoader worker, if it is a user
    error; None otherwise (including for a bug, whose message holds the worker's traceback)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    match = _WORKER.match(text)
    if match is None:
        return None
    # The worker's traceback ends with "<module>.<Type>: <message>" (possibly several lines).
    lines = text.splitlines()
    for i in range(len(lines) - 1, 0, -1):
        head = re.match(r"^([\w.]*\b" + match.group(1) + r"): ?(.*)$", lines[i])
        if head is None:
            continue
        original = "\n".join([head.group(2), *lines[i + 1 :]])
        cls = _resolve(head.group(1))
        if cls is not None and _is_user_error(cls):
            return _one_line(original)
        try:
            inner = cls(original) if cls is not None else None
        except Exception:
            inner = None
        if inner is None or _is_user_error(type(inner)):
            return None
        # A library error re-built from its message (no traceback to read): only those whose
        # message suffices (missing files; YAML and omegaconf errors carry the key in the text).
        if isinstance(inner, (FileNotFoundError, IsADirectoryError, PermissionError)):
            return _one_line(original)
        return None
    return None


def _resolve(dotted: str) -> type | None:
    module, _, name = dotted.rpartition(".")
    obj = sys.modules.get(module or "builtins")
    cls = getattr(obj, name, None) if obj is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None
