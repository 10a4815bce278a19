"""Llama-3 / 3.1 decoders and tokenizer (torchtune's), plus tiny ones for tests.

The image placeholder is defined here, once: :data:`IMAGE_TOKEN`, a reserved Llama-3 special token
(``<|reserved_special_token_0|>``, id 128002 in the real 3.0 and 3.1 vocabularies). Prompts are
built as token ids with the real chat special tokens (:func:`encode_messages`) and stay ids up to
generation: text is never decoded and re-encoded.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torchtune.models import llama3 as _tt_llama3
from torchtune.models import llama3_1 as _tt_llama3_1
from torchtune.models.llama3 import Llama3Tokenizer
from torchtune.modules import TransformerDecoder
from torchtune.modules.tokenizers import parse_hf_tokenizer_json

IMAGE_TOKEN = "<|reserved_special_token_0|>"
"""The reserved special token whose id marks image positions in a prompt."""

_DECODER_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "medtune_decoder_device", default=None
)


@contextlib.contextmanager
def build_decoders_on(device: str | torch.device | None) -> Iterator[None]:
    """Build every Llama-3 decoder made by medtune's builders on ``device`` while inside.

    The distributed recipes build the LLM on ``meta`` and fill it shard by shard, while encoders
    and connectors (small, with weights their builders load) are built where the caller's device
    context says. Every decoder builder in :mod:`medtune.models` goes through
    :func:`build_decoder`, which honours this setting; nothing is patched at run time.
    """
    token = _DECODER_DEVICE.set(None if device is None else str(device))
    try:
        yield
    finally:
        _DECODER_DEVICE.reset(token)


def build_decoder(fn: Callable[..., TransformerDecoder], **kwargs) -> TransformerDecoder:
    """Call a torchtune decoder builder on the device set by :func:`build_decoders_on`."""
    device = _DECODER_DEVICE.get()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return fn(**kwargs)


def llama3(**kwargs) -> TransformerDecoder:
    """torchtune's ``llama3`` component builder (any shape), honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3.llama3, **kwargs)


def llama3_1(**kwargs) -> TransformerDecoder:
    """torchtune's ``llama3_1`` component builder, honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3_1.llama3_1, **kwargs)


def llama3_8b() -> TransformerDecoder:
    """Llama-3-8B (torchtune's ``llama3_8b``), honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3.llama3_8b)


def llama3_70b() -> TransformerDecoder:
    """Llama-3-70B (torchtune's ``llama3_70b``), honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3.llama3_70b)


def llama3_1_8b() -> TransformerDecoder:
    """Llama-3.1-8B (torchtune's ``llama3_1_8b``), honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3_1.llama3_1_8b)


def llama3_1_70b() -> TransformerDecoder:
    """Llama-3.1-70B (torchtune's ``llama3_1_70b``), honouring :func:`build_decoders_on`."""
    return build_decoder(_tt_llama3_1.llama3_1_70b)


__all__ = [
    "IMAGE_TOKEN",
    "build_decoders_on",
    "llama3_tokenizer",
    "special_tokens_for_base_vocab",
    "image_token_id",
    "encode_messages",
    "llama3_8b",
    "llama3_70b",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_tiny",
    "llama3",
    "llama3_1",
]


# Llama-3.1's 256 special tokens (ids 128000..128255), by offset. torchtune's LLAMA3_SPECIAL_TOKENS
# follows Llama-3.2 instead (``<|step_id|>`` at +5, ``<|video|>`` at +12, nothing at +11), so it is not
# used to lay out a tokenizer.
_LLAMA31_SPECIAL_OFFSETS: dict[str, int] = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|reserved_special_token_0|>": 2,
    "<|reserved_special_token_1|>": 3,
    "<|finetune_right_pad_id|>": 4,
    "<|reserved_special_token_2|>": 5,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eom_id|>": 8,
    "<|eot_id|>": 9,
    "<|python_tag|>": 10,
    **{f"<|reserved_special_token_{i}|>": 11 + i - 3 for i in range(3, 248)},
}
# Names torchtune's Llama3Tokenizer requires. A real Llama-3.0 tokenizer.json lacks the first three
# (its ids 128004/128008/128010 are reserved tokens there): they get the 3.1 ids, as torchtune's own
# table gives them. No Llama-3 / 3.1 text vocabulary has the last three: they get ids past the end
# of the vocabulary, so they can never collide with a real token.
_REQUIRED_AT_31_ID = ("<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>")
_REQUIRED_PAST_END = ("<|image|>", "<|step_id|>", "<|video|>")


def special_tokens_for_base_vocab(n_base: int) -> dict[str, int]:
    """Llama-3's special tokens laid out after a base vocabulary of ``n_base`` ranks.

    The real tokenizer has 128,000 base ranks followed by 256 special tokens; a tiny tokenizer keeps
    the same names and order (Llama-3.1's) at ``n_base + offset``. ``<|image|>`` (Llama-3.2 Vision,
    beyond the text models' embedding table) is placed right after the 256 specials, as in torchtune.
    """
    out = {name: n_base + off for name, off in _LLAMA31_SPECIAL_OFFSETS.items()}
    out["<|image|>"] = n_base + 256
    return out


def _complete_specials(special: dict[str, int]) -> dict[str, int]:
    special = dict(special)
    if "<|begin_of_text|>" not in special:
        raise ValueError("special tokens lack <|begin_of_text|>: not a Llama-3 tokenizer")
    first = special["<|begin_of_text|>"]
    for name in _REQUIRED_AT_31_ID:
        special.setdefault(name, first + _LLAMA31_SPECIAL_OFFSETS[name])
    for name in _REQUIRED_PAST_END:
        if name not in special:
            special[name] = max(special.values()) + 1
    return special


def _count_ranks(path: str | Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def llama3_tokenizer(
    path: str,
    special_tokens_path: str | None = None,
    max_seq_len: int | None = None,
) -> Llama3Tokenizer:
    """Build torchtune's Llama-3 tokenizer from a tiktoken ``tokenizer.model`` file.

    Args:
        path: the tiktoken rank file (``original/tokenizer.model`` in a Meta/HF download).
        special_tokens_path: an HF ``tokenizer.json`` whose ``added_tokens`` give the special ids.
            When omitted, :func:`special_tokens_for_base_vocab` lays them out after the base ranks
            (128000.. for the real vocabulary).
        max_seq_len: truncate tokenized samples to this length.

    Returns:
        The tokenizer; ``tokenizer.special_tokens[IMAGE_TOKEN]`` is the image placeholder id.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (expected a tiktoken tokenizer.model)"
        )
    if special_tokens_path is not None:
        if not Path(special_tokens_path).is_file():
            raise FileNotFoundError(f"special tokens file not found: {special_tokens_path}")
        special = parse_hf_tokenizer_json(special_tokens_path)
    else:
        special = special_tokens_for_base_vocab(_count_ranks(path))
    if IMAGE_TOKEN not in special:
        raise ValueError(
            f"{special_tokens_path or path}: tokenizer lacks the image placeholder {IMAGE_TOKEN}"
        )
    special = _complete_specials(special)  # e.g. a real Llama-3 tokenizer.json has no <|step_id|>
    return Llama3Tokenizer(path=path, special_tokens=special, max_seq_len=max_seq_len)


def image_token_id(tokenizer: Llama3Tokenizer) -> int:
    """The id of :data:`IMAGE_TOKEN` in this tokenizer."""
    return tokenizer.special_tokens[IMAGE_TOKEN]


def encode_messages(
    tokenizer: Llama3Tokenizer,
    messages: Sequence[tuple[str, Sequence[str | int]]],
    *,
    add_generation_prompt: bool = False,
    train_on: Sequence[str] = ("assistant",),
) -> tuple[list[int], list[bool]]:
    """Encode chat turns into Llama-3 Instruct ids, keeping image placeholders as ids.

    Layout (the official Llama-3 chat format)::

        <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...

    Args:
        tokenizer: a Llama-3 tokenizer.
        messages: ``(role, parts)`` pairs; each part is text (encoded without special tokens, the
            whole turn's text stripped at its ends as Meta's reference does) or an int token id
            inserted verbatim (e.g. the image placeholder repeated N times).
        add_generation_prompt: end with an open assistant header, for generation.
        train_on: roles whose content and closing ``<|eot_id|>`` are loss targets.

    Returns:
        ``(ids, mask)``: token ids and, per id, whether it is a loss target.
    """
    ids: list[int] = [tokenizer.bos_id]
    mask: list[bool] = [False]
    nl2 = tokenizer.encode("\n\n", add_bos=False, add_eos=False)
    for role, parts in messages:
        header = [
            tokenizer.start_header_id,
            *tokenizer.encode(role, add_bos=False, add_eos=False),
            tokenizer.end_header_id,
            *nl2,
        ]
        ids += header
        mask += [False] * len(header)
        target = role in train_on
        body: list[int] = []
        # Strip the turn's text at its outer ends only, as the reference chat format does.
        parts = list(parts)
        text_idx = [i for i, p in enumerate(parts) if isinstance(p, str)]
        if text_idx:
            parts[text_idx[0]] = (
                parts[text_idx[0]].lstrip() if text_idx[0] == 0 else parts[text_idx[0]]
            )
            parts[text_idx[-1]] = (
                parts[text_idx[-1]].rstrip()
                if text_idx[-1] == len(parts) - 1
                else parts[text_idx[-1]]
            )
        for part in parts:
            if isinstance(part, str):
                if part:
                    body += tokenizer.encode(part, add_bos=False, add_eos=False)
            else:
                body.append(int(part))
        body.append(tokenizer.eot_id)
        ids += body
        mask += [target] * len(body)
    if add_generation_prompt:
        header = [
            tokenizer.start_header_id,
            *tokenizer.encode("assistant", add_bos=False, add_eos=False),
            tokenizer.end_header_id,
            *nl2,
        ]
        ids += header
        mask += [False] * len(header)
    return ids, mask


def llama3_tiny(
    vocab_size: int,
    embed_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
) -> TransformerDecoder:
    """A tiny Llama-3 (same architecture: GQA, RoPE base 500k, SwiGLU, RMSNorm) for tests and the demo."""
    return llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
    )


def _rope(cfg: dict) -> dict:
    """transformers 5's ``rope_parameters`` (``rope_theta``, ``rope_type``, ``factor``), or {}."""
    return cfg.get("rope_parameters") or {}


def decoder_shape_kwargs(
    cfg: dict,
    config_path: str | Path,
    max_seq_len: int | None = None,
    *,
    context: int,
    rope_base: float,
    what: str = "an HF config.json",
) -> dict:
    """The shape arguments every torchtune decoder builder takes (Llama-2/3, Mistral, Qwen2), read
    from an HF config dict; ``context`` and ``rope_base`` are the family's defaults for
    ``max_position_embeddings`` and ``rope_theta``.

    Raises:
        ValueError: a required key is missing (names ``config_path`` and the key).
    """
    try:
        return dict(
            vocab_size=cfg["vocab_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            embed_dim=cfg["hidden_size"],
            intermediate_dim=cfg["intermediate_size"],
            max_seq_len=max_seq_len or cfg.get("max_position_embeddings", context),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            # transformers 5 writes rope_theta inside rope_parameters
            rope_base=cfg.get("rope_theta", _rope(cfg).get("rope_theta", rope_base)),
        )
    except KeyError as e:
        raise ValueError(f"{config_path}: missing key {e} (expected {what})") from None


def head_layout(cfg: dict) -> dict:
    """The head layout of an HF LLM config dict, as the keyword arguments of torchtune's
    ``convert_weights`` converters (``num_heads num_kv_heads dim head_dim``)."""
    return {
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "dim": cfg["hidden_size"],
        "head_dim": cfg.get("head_dim"),
    }


def hf_config_kwargs(
    config_path: str | Path, max_seq_len: int | None = None
) -> tuple[dict, float | None]:
    """torchtune Llama-3 builder arguments from an HF ``config.json``.

    Returns:
        ``(kwargs, scale_factor)``: ``scale_factor`` is the Llama-3.1 rope scaling factor
        (``rope_scaling.rope_type == "llama3"``), None for Llama-3.

    Raises:
        ValueError: a required key is missing (names the file and the key).
    """
    cfg = json.loads(Path(config_path).read_text())
    kwargs = decoder_shape_kwargs(
        cfg, config_path, max_seq_len, context=8192, rope_base=500_000, what="an HF LlamaConfig"
    )
    scaling = cfg.get("rope_scaling") or _rope(cfg)
    return kwargs, (scaling.get("factor", 8) if scaling.get("rope_type") == "llama3" else None)


def llama3_from_hf_config(
    config_path: str | Path, max_seq_len: int | None = None
) -> TransformerDecoder:
    """Build a torchtune Llama-3 decoder with the shape given in an HF ``config.json``.

    Llama-3.1 rope scaling (``rope_scaling.rope_type == "llama3"``) selects torchtune's
    ``llama3_1`` builder.
    """
    kwargs, scale = hf_config_kwargs(config_path, max_seq_len)
    if scale is not None:
        return llama3_1(**kwargs, scale_factor=scale)
    return llama3(**kwargs)


def decoder_dtype(name: str | None) -> torch.dtype:
    """``"bf16" | "fp32" | "fp16"`` -> torch dtype."""
    table = {
        None: torch.float32,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: expected one of fp32, bf16, fp16")
    return table[name]
