"""Answer backends for eval: each turns samples into answer texts; eval does not care which.

- ``medtune`` (:class:`MedtuneBackend`): a medtune checkpoint folder, through
  :func:`medtune.inference.answer` (batched, KV-cached, data-parallel under torchrun);
- ``hf`` (:class:`HFBackend`): any transformers image-text-to-text folder (``AutoProcessor`` +
  ``AutoModelForImageTextToText``, its chat template, batched ``generate``, bf16 on CUDA,
  data-parallel under torchrun);
- ``openai`` (:class:`OpenAIBackend`): any OpenAI-compatible server (vLLM, SGLang,
  ``medtune serve``): images as data URLs, bounded concurrency, retries (the judge's HTTP client,
  :mod:`medtune.eval.judge.http`); rank 0 sends, the others receive the texts.

Every backend has ``answer(samples, settings) -> list[str]`` (one text per sample, in order, on
every rank), ``identity`` (what predictions rows record as ``checkpoint``) and ``close()``.
A spec is a checkpoint path (``medtune``) or a mapping with ``model: medtune | hf | openai``
(:func:`parse_spec`).
"""

from __future__ import annotations

from typing import Any

from medtune.eval.backends.errors import BackendConfigError

__all__ = ["BACKENDS", "BackendConfigError", "build_backend", "parse_spec"]

BACKENDS = ("medtune", "hf", "openai")
#: keys each backend's spec accepts (besides ``model``)
SPEC_KEYS = {
    "medtune": {"path"},
    "hf": {"path", "dtype", "batch_size", "trust_remote_code"},
    "openai": {
        "base_url",
        "name",
        "api_key_env",
        "concurrency",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "system_prompt",
        "extra_body",
    },
}


def parse_spec(name: str, value: Any) -> dict[str, Any]:
    """Normalize one ``checkpoints`` entry.

    Args:
        name: the entry's name (the table's ``checkpoint`` column).
        value: a path (a medtune checkpoint) or a mapping ``{model: medtune|hf|openai, ...}``.

    Returns:
        The spec with ``model`` set and ``identity``: the path for ``medtune`` / ``hf``,
        ``openai:<name>@<base_url>`` for ``openai``.

    Raises:
        BackendConfigError: an unknown ``model``, an unknown key or a missing one.
    """
    if not isinstance(value, dict):
        return {"model": "medtune", "path": str(value), "identity": str(value)}
    spec = dict(value)
    kind = spec.get("model", "medtune")
    if kind not in BACKENDS:
        raise BackendConfigError(
            f"checkpoints.{name}.model: {kind!r} (expected one of {', '.join(BACKENDS)})"
        )
    spec["model"] = kind
    unknown = sorted(set(spec) - SPEC_KEYS[kind] - {"model"})
    if unknown:
        raise BackendConfigError(
            f"checkpoints.{name}: unknown key(s) {', '.join(unknown)} for model: {kind} "
            f"(known: {', '.join(sorted(SPEC_KEYS[kind]))})"
        )
    need = ("base_url", "name") if kind == "openai" else ("path",)
    missing = [k for k in need if not spec.get(k)]
    if missing:
        raise BackendConfigError(f"checkpoints.{name}: model: {kind} needs {', '.join(missing)}")
    spec["identity"] = (
        f"openai:{spec['name']}@{spec['base_url']}" if kind == "openai" else str(spec["path"])
    )
    return spec


def build_backend(spec: dict[str, Any], **common: Any):
    """The backend of a parsed spec.

    Args:
        spec: from :func:`parse_spec`.
        **common: ``device``, ``batch_size``, ``system_prompt``, ``window``, ``blank_images``,
            ``llm_dtype``, ``checkpoint_overrides`` (each backend takes what it uses).
    """
    kind = spec["model"]
    if kind == "medtune":
        from medtune.eval.backends.medtune import MedtuneBackend

        return MedtuneBackend(spec, **common)
    if kind == "hf":
        from medtune.eval.backends.hf import HFBackend

        return HFBackend(spec, **common)
    from medtune.eval.backends.openai import OpenAIBackend

    return OpenAIBackend(spec, **common)
