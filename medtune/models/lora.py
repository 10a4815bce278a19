"""LoRA / DoRA / QLoRA Llama-3 decoders (torchtune's LoRA modules) and MedVLMs built on them.

Every builder here returns either a torchtune ``TransformerDecoder`` whose chosen linear layers are
``LoRALinear`` (``use_dora=True``: ``DoRALinear``; ``quantize_base=True``: the frozen base weights
are torchao ``NF4Tensor``), or a :class:`~medtune.models.medvlm.MedVLM` holding such a decoder.
The decoder's state dict keeps the base model's key names (``layers.0.attn.q_proj.weight``) and
adds ``...lora_a.weight`` / ``...lora_b.weight`` (and ``...magnitude`` for DoRA), so torchtune's
checkpointers load base Llama-3 weights unchanged and the adapters start at their LoRA init.

QLoRA: NF4 quantizes in blocks of 64 values with scalers in blocks of 256, so every quantized
weight needs ``numel`` divisible by 256 (in practice: model width >= 256). Only the linear layers
of the attention and MLP are quantized (torchtune never quantizes ``output``).

All decoder construction goes through :func:`_decoder`, which honours :func:`build_decoders_on`
(the distributed recipes build the LLM on the ``meta`` device and load it shard by shard).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torchtune.models.llama3 import lora_llama3, lora_llama3_8b
from torchtune.models.llama3_1 import lora_llama3_1, lora_llama3_1_8b
from torchtune.modules import TransformerDecoder

from medtune.models.builders import image_token_id_for_vocab, medvlm
from medtune.models.encoders import biomedclip_vision, open_clip_vision
from medtune.models.llama3 import hf_config_kwargs
from medtune.models.medvlm import MedVLM

__all__ = [
    "LORA_ATTN_MODULES",
    "build_decoders_on",
    "lora_llama3_from_hf_config",
    "lora_settings",
    "medvlm_open_clip_lora_llama3",
    "medvlm_biomedclip_lora_llama3_8b",
    "medvlm_biomedclip_lora_llama3_1_8b",
    "tiny_medvlm_lora",
]

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")

_DECODER_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "medtune_decoder_device", default=None
)


@contextlib.contextmanager
def build_decoders_on(device: str | torch.device | None) -> Iterator[None]:
    """Build every decoder made by this module on ``device`` (e.g. ``"meta"``) while inside.

    Encoders and connectors are unaffected: they are built where the caller's context says.
    """
    token = _DECODER_DEVICE.set(None if device is None else str(device))
    try:
        yield
    finally:
        _DECODER_DEVICE.reset(token)


def _decoder(fn: Callable[..., TransformerDecoder], **kwargs) -> TransformerDecoder:
    device = _DECODER_DEVICE.get()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return fn(**kwargs)


def _check_modules(lora_attn_modules: Sequence[str]) -> list[str]:
    mods = list(lora_attn_modules)
    bad = [m for m in mods if m not in LORA_ATTN_MODULES]
    if bad:
        raise ValueError(
            f"lora_attn_modules: unknown {bad} (choose among {', '.join(LORA_ATTN_MODULES)})"
        )
    return mods


def _lora_kwargs(
    lora_attn_modules,
    apply_lora_to_mlp,
    apply_lora_to_output,
    lora_rank,
    lora_alpha,
    lora_dropout,
    use_dora,
    quantize_base,
) -> dict:
    return dict(
        lora_attn_modules=_check_modules(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )


def lora_llama3_from_hf_config(
    config_path: str | Path,
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    max_seq_len: int | None = None,
) -> TransformerDecoder:
    """A LoRA Llama-3 (or 3.1, from ``rope_scaling``) shaped by an HF ``config.json``.

    Args:
        config_path: the HF ``config.json`` of the base model.
        lora_attn_modules: attention projections to adapt (``q_proj k_proj v_proj output_proj``).
        apply_lora_to_mlp: adapt ``w1 w2 w3`` of every MLP.
        apply_lora_to_output: adapt the final ``output`` projection (never quantized).
        lora_rank: rank r of ``lora_b @ lora_a`` ([out, r] @ [r, in]).
        lora_alpha: the update is scaled by ``alpha / r``.
        lora_dropout: dropout on the adapter input.
        use_dora: DoRA (magnitude [out] x direction) instead of plain LoRA.
        quantize_base: QLoRA: NF4 base weights (weight ``numel`` divisible by 256).
        max_seq_len: overrides ``max_position_embeddings``.

    Returns:
        A ``TransformerDecoder``: tokens [b, s] (or embeddings [b, s, d]) -> logits [b, s, vocab].
    """
    kwargs, scale = hf_config_kwargs(config_path, max_seq_len)
    lora = _lora_kwargs(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
    )
    if scale is not None:
        return _decoder(lora_llama3_1, **kwargs, **lora, scale_factor=scale)
    return _decoder(lora_llama3, **kwargs, **lora)


def medvlm_open_clip_lora_llama3(
    llm_config: str,
    encoder_path: str,
    connector: str = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    max_seq_len: int | None = None,
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> MedVLM:
    """Any open_clip tower (hub-layout folder) + connector + a LoRA Llama-3 shaped by ``llm_config``.

    The LoRA arguments are those of :func:`lora_llama3_from_hf_config`; the others those of
    :func:`medtune.models.builders.medvlm_open_clip_llama3`.
    """
    dec = lora_llama3_from_hf_config(
        llm_config,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        max_seq_len=max_seq_len,
    )
    enc = open_clip_vision(encoder_path, output=output)
    return medvlm(
        dec,
        enc,
        connector=connector,
        connector_kwargs=connector_kwargs,
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )


def tiny_medvlm_lora(
    assets_dir: str, connector: str = "mlp", llm_dir: str = "llama3_tiny", **lora
) -> MedVLM:
    """The tiny MedVLM of the generated assets (``medtune.testing.assets``) with a LoRA decoder.

    Args:
        assets_dir: the tiny assets folder.
        connector: connector kind.
        llm_dir: sub-folder of the LLM (its ``config.json`` shapes the decoder).
        **lora: arguments of :func:`lora_llama3_from_hf_config`.
    """
    return medvlm_open_clip_lora_llama3(
        f"{assets_dir}/{llm_dir}/config.json",
        f"{assets_dir}/tiny_clip",
        connector=connector,
        **lora,
    )


def _biomedclip_lora_builder(llm_builder: Callable[..., TransformerDecoder], name: str, llm: str):
    """A named BiomedCLIP + LoRA Llama-3 builder around torchtune's ``llm_builder``."""

    def builder(
        encoder_path: str | None = None,
        connector: str = "mlp",
        lora_attn_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
        apply_lora_to_mlp: bool = True,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: bool = False,
    ) -> MedVLM:
        dec = _decoder(
            llm_builder,
            **_lora_kwargs(
                lora_attn_modules,
                apply_lora_to_mlp,
                apply_lora_to_output,
                lora_rank,
                lora_alpha,
                lora_dropout,
                use_dora,
                quantize_base,
            ),
        )
        return medvlm(dec, biomedclip_vision(encoder_path, output="patch"), connector=connector)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"BiomedCLIP patch tokens (196 x 768) -> LLaVA MLP -> LoRA {llm} (torchtune's "
        f"``{llm_builder.__name__}``).\n\n    ``encoder_path=None`` builds the tower with random weights "
        "(e.g. on the meta device); the LoRA arguments are those of\n    "
        ":func:`lora_llama3_from_hf_config`.\n    "
    )
    return builder


medvlm_biomedclip_lora_llama3_8b = _biomedclip_lora_builder(
    lora_llama3_8b, "medvlm_biomedclip_lora_llama3_8b", "Llama-3-8B-Instruct"
)
medvlm_biomedclip_lora_llama3_1_8b = _biomedclip_lora_builder(
    lora_llama3_1_8b, "medvlm_biomedclip_lora_llama3_1_8b", "Llama-3.1-8B-Instruct"
)


def lora_settings(model: torch.nn.Module) -> dict:
    """Read the LoRA settings back from a built model (for the PEFT ``adapter_config.json``).

    Returns:
        ``{"r", "lora_alpha", "target_modules" (torchtune names), "use_dora", "lora_dropout"}``; empty when the model
        has no LoRA layer.
    """
    from torchtune.modules.peft import DoRALinear, LoRALinear

    rank, alpha, targets, dora, dropout = None, None, [], False, 0.0
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, DoRALinear)):
            rank = int(m.lora_a.weight.shape[0])
            alpha = (
                getattr(m, "alpha", None) or m.scaling * rank
            )  # DoRALinear keeps only alpha / rank
            dropout = float(getattr(m.dropout, "p", 0.0))
            dora = dora or isinstance(m, DoRALinear)
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                targets.append(leaf)
    if rank is None:
        return {}
    return {
        "r": rank,
        "lora_alpha": float(alpha),
        "target_modules": targets,
        "use_dora": dora,
        "lora_dropout": dropout,
    }
