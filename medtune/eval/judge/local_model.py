"""What the local judge backends share (one process, :mod:`.backends`; FSDP2, :mod:`.sharded`):
the ``judge`` section's settings, instantiating its nodes, and ``generate_texts(prompts)`` over
:func:`medtune.inference.answer`. The model itself is built and loaded by the one loader,
:func:`medtune.training.loader.load_model` (one process) or
:func:`medtune.training.setup.load_sharded` (FSDP2).

Split out of ``backends.py`` (``sharded`` imported its private helpers while ``backends`` imported
``sharded``: a cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def instantiate_node(node: Any) -> Any:
    """``torchtune.config.instantiate`` for a config node that may arrive as a plain dict."""
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config as tt_config

    return tt_config.instantiate(node if isinstance(node, DictConfig) else OmegaConf.create(node))


def generate_texts_fn(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    sync_next: Callable[[Any], Any] | None = None,
) -> Callable[[list[str]], list[str]]:
    """``generate_texts(prompts) -> texts``: each prompt one user turn through the model transform,
    greedy and batched by :func:`medtune.inference.answer` (every rank runs every batch: a sharded
    model needs all ranks in each forward, so the prompts are not split across ranks)."""
    from medtune.data.model_transform import medvlm_transform
    from medtune.data.sample import Message, Sample
    from medtune.generation import GenerationConfig
    from medtune.inference import answer

    transform = medvlm_transform(model, tokenizer)
    settings = GenerationConfig.from_config({"max_new_tokens": max_new_tokens, "temperature": 0.0})

    def generate_texts(prompts: list[str]) -> list[str]:
        samples = [Sample(str(i), [], [Message("user", p)], {}) for i, p in enumerate(prompts)]
        out = answer(
            model,
            transform,
            samples,
            settings,
            tokenizer=tokenizer,
            batch_size=batch_size,
            data_parallel=False,
            sync_next=sync_next,
        )
        return [a.text for a in out]

    return generate_texts


def judge_settings(cfg: Mapping[str, Any], device: Any) -> tuple[Any, str | None, int, int]:
    """(dtype, quantize, max_new_tokens, batch_size) from the ``judge`` config section."""
    from medtune.models.llama3 import decoder_dtype

    dtype = decoder_dtype(cfg.get("dtype") or ("bf16" if device.type == "cuda" else "fp32"))
    quantize = cfg.get("quantize")
    if quantize not in (None, "nf4"):  # medtune.training.loader.QUANTIZE (no torch here)
        raise ValueError(f"judge.quantize must be null or nf4, got {quantize!r}")
    return dtype, quantize, int(cfg.get("max_new_tokens", 8)), max(1, int(cfg.get("batch_size", 8)))
