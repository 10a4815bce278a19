"""The text side of :mod:`medtune.models.dual_encoder`: the tokenizer of a dual encoder's text
tower (open_clip's ``HFTokenizer`` from local files, or its bundled BPE), offline.

Re-exported by :mod:`medtune.models.dual_encoder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DualTokenizer", "TowerConfigError", "dual_tokenizer"]

_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
)


class TowerConfigError(ValueError):
    """A dual-encoder config or folder that cannot be built (names the file or key)."""


class DualTokenizer:
    """Text -> token ids for the model's text tower (open_clip's tokenizers, offline).

    Args:
        tokenizer: an open_clip tokenizer (``SimpleTokenizer`` or ``HFTokenizer``).
        context_length: ids per text (padded / truncated).
        source: the folder the vocabulary came from (None: open_clip's bundled BPE).
    """

    def __init__(self, tokenizer: Any, context_length: int, source: str | None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.source = source

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Args: texts, n strings. Returns: int64 [n, context_length]."""
        return self.tokenizer(list(texts), context_length=self.context_length)


def _tokenizer_dir(*folders: str | Path | None) -> str | None:
    for f in folders:
        if f and any(
            (Path(f) / n).is_file() for n in ("vocab.txt", "tokenizer.json", "vocab.json")
        ):
            return str(f)
    return None


def dual_tokenizer(
    config: dict, folder: str | Path | None = None, text_model_dir: str | None = None
) -> DualTokenizer:
    """The tokenizer of a config's text tower: HF (files in ``folder``, else ``text_model_dir``)
    or open_clip's bundled BPE."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    tc = config["model_cfg"].get("text_cfg") or {}
    ctx = int(tc.get("context_length", 77))
    if tc.get("hf_tokenizer_name") or tc.get("hf_model_name"):
        src = _tokenizer_dir(folder, text_model_dir)
        if src is None:
            raise TowerConfigError(
                f"no tokenizer files (vocab.txt / tokenizer.json) in {folder} or text_model_dir={text_model_dir}"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return DualTokenizer(
            HFTokenizer(src, context_length=ctx, **tc.get("tokenizer_kwargs", {}) or {}), ctx, src
        )
    return DualTokenizer(SimpleTokenizer(context_length=ctx), ctx, None)
