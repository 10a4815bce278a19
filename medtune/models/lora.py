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

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchtune.models.llama3 import lora_llama3, lora_llama3_8b
from torchtune.models.llama3_1 import lora_llama3_1, lora_llama3_1_8b
from torchtune.modules import TransformerDecoder

from medtune.models.builders import medvlm, open_clip_medvlm
from medtune.models.connectors import ConnectorKind
from medtune.models.encoders import biomedclip_vision
from medtune.models.llama3 import build_decoder, build_decoders_on, hf_config_kwargs
from medtune.models.medvlm import MedVLM

__all__ = [
    "LORA_ATTN_MODULES",
    "build_decoders_on",
    "lora_args",
    "lora_llama3_from_hf_config",
    "lora_settings",
    "medvlm_open_clip_lora_llama3",
    "medvlm_biomedclip_lora_llama3_8b",
    "medvlm_biomedclip_lora_llama3_1_8b",
    "tiny_medvlm_lora",
]

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def _decoder(fn: Callable[..., TransformerDecoder], **kwargs) -> TransformerDecoder:
    return build_decoder(fn, **kwargs)


def _check_modules(lora_attn_modules: Sequence[str]) -> list[str]:
    mods = list(lora_attn_modules)
    bad = [m for m in mods if m not in LORA_ATTN_MODULES]
    if bad:
        raise ValueError(
            f"lora_attn_modules: unknown {bad} (choose among {', '.join(LORA_ATTN_MODULES)})"
        )
    return mods


def lora_args(
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> dict:
    """The LoRA arguments of torchtune's ``lora_llama3*`` builders, checked: the one list of them
    that every LoRA builder here takes (see :func:`_takes_lora_args`).

    Args:
        lora_attn_modules: attention projections to adapt (``q_proj k_proj v_proj output_proj``).
        apply_lora_to_mlp: adapt ``w1 w2 w3`` of every MLP.
        apply_lora_to_output: adapt the final ``output`` projection (never quantized).
        lora_rank: rank r of ``lora_b @ lora_a`` ([out, r] @ [r, in]).
        lora_alpha: the update is scaled by ``alpha / r``.
        lora_dropout: dropout on the adapter input.
        use_dora: DoRA (magnitude [out] x direction) instead of plain LoRA.
        quantize_base: QLoRA: NF4 base weights (weight ``numel`` divisible by 256).

    Returns:
        The arguments by name, ``lora_attn_modules`` as a checked list.

    Raises:
        ValueError: an unknown attention module.
    """
    kwargs = dict(locals())
    kwargs["lora_attn_modules"] = _check_modules(lora_attn_modules)
    return kwargs


_LORA_PARAMS = tuple(inspect.signature(lora_args).parameters.values())


def _takes_lora_args(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a builder ``fn(..., *, lora: dict, ...)`` the arguments of :func:`lora_args` instead of
    ``lora``, with ``defaults`` over theirs.

    The builder's signature lists them after its own positional parameters (config checks bind
    against it, and positional calls keep their order); ``fn`` receives them as ``lora``, the dict
    :func:`lora_args` returns.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "lora"]
        extra = [p.replace(default=defaults.get(p.name, p.default)) for p in _LORA_PARAMS]
        public = sig.replace(
            parameters=[p for p in own if p.kind is p.POSITIONAL_OR_KEYWORD]
            + extra
            + [p for p in own if p.kind is p.KEYWORD_ONLY]
        )

        @functools.wraps(fn)
        def builder(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            lora = lora_args(**{p.name: values.pop(p.name) for p in _LORA_PARAMS})
            return fn(**values, lora=lora)

        builder.__signature__ = public
        builder.__doc__ = (fn.__doc__ or "") + (
            "\n\n    LoRA arguments: those of :func:`lora_args`"
            + (f" (defaults here: {defaults})" if defaults else "")
            + ".\n"
        )
        return builder

    return wrap


@_takes_lora_args()
def lora_llama3_from_hf_config(
    config_path: str | Path, *, lora: dict, max_seq_len: int | None = None
) -> TransformerDecoder:
    """A LoRA Llama-3 (or 3.1, from ``rope_scaling``) shaped by an HF ``config.json``.

    Args:
        config_path: the HF ``config.json`` of the base model.
        max_seq_len: overrides ``max_position_embeddings``.

    Returns:
        A ``TransformerDecoder``: tokens [b, s] (or embeddings [b, s, d]) -> logits [b, s, vocab].
    """
    kwargs, scale = hf_config_kwargs(config_path, max_seq_len)
    if scale is not None:
        return _decoder(lora_llama3_1, **kwargs, **lora, scale_factor=scale)
    return _decoder(lora_llama3, **kwargs, **lora)


@_takes_lora_args()
def medvlm_open_clip_lora_llama3(
    llm_config: str,
    encoder_path: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    max_seq_len: int | None = None,
    *,
    lora: dict,
) -> MedVLM:
    """Any open_clip tower (hub-layout folder) + connector + a LoRA Llama-3 shaped by ``llm_config``.

    The other arguments are those of :func:`medtune.models.builders.medvlm_open_clip_llama3`.
    """
    dec = lora_llama3_from_hf_config(llm_config, **lora, max_seq_len=max_seq_len)
    return open_clip_medvlm(dec, encoder_path, connector, output, connector_kwargs)


@_takes_lora_args()
def tiny_medvlm_lora(
    assets_dir: str, connector: ConnectorKind = "mlp", llm_dir: str = "llama3_tiny", *, lora: dict
) -> MedVLM:
    """The tiny MedVLM of the generated assets (``medtune.testing.assets``) with a LoRA decoder.

    Args:
        assets_dir: the tiny assets folder.
        connector: connector kind.
        llm_dir: sub-folder of the LLM (its ``config.json`` shapes the decoder).
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
        encoder_path: str | None = None, connector: ConnectorKind = "mlp", *, lora: dict
    ) -> MedVLM:
        dec = _decoder(llm_builder, **lora)
        return medvlm(dec, biomedclip_vision(encoder_path, output="patch"), connector=connector)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"BiomedCLIP patch tokens (196 x 768) -> LLaVA MLP -> LoRA {llm} (torchtune's "
        f"``{llm_builder.__name__}``).\n\n    ``encoder_path=None`` builds the tower with random "
        "weights (e.g. on the meta device)."
    )
    return _takes_lora_args(lora_attn_modules=LORA_ATTN_MODULES, apply_lora_to_mlp=True)(builder)


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


def clean_name(name: str) -> str:
    """A parameter or module name without activation-checkpointing wrapper parts (as
    ``state_dict`` names it)."""
    return name.replace("._checkpoint_wrapped_module", "").replace(
        "_checkpoint_wrapped_module.", ""
    )


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Name (as ``state_dict`` keys name it) -> every torchtune ``LoRALinear`` / ``DoRALinear``."""
    from torchtune.modules.peft import DoRALinear, LoRALinear

    return {
        clean_name(n): m
        for n, m in model.named_modules()
        if isinstance(m, (LoRALinear, DoRALinear))
    }


def adapter_init_state(
    model: torch.nn.Module, base: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Full (unsharded) initial adapter tensors for every LoRA layer of ``model``, from ``seed``.

    The same tensors on any number of ranks, so 1 and N processes start from the same model.

    Args:
        model: holds the LoRA layers (their parameters may be on ``meta`` or sharded).
        base: the full base state dict (same key names as ``model``), for DoRA magnitudes.
        seed: seeds a CPU generator; layers are visited in ``named_modules`` order.

    Returns:
        ``{name.lora_a.weight: [r, in] Kaiming uniform, name.lora_b.weight: [out, r] zeros,
        name.magnitude: [out] (DoRA) ||W||_row}``, float32 on CPU.
    """
    import math

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_modules(model).items():
        a = torch.empty(tuple(m.lora_a.weight.shape), dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[f"{name}.lora_a.weight"] = a
        out[f"{name}.lora_b.weight"] = torch.zeros(tuple(m.lora_b.weight.shape))
        if hasattr(m, "magnitude"):  # lora_b = 0: ||W + s * B @ A|| = ||W||
            out[f"{name}.magnitude"] = torch.linalg.norm(base[f"{name}.weight"].float(), dim=1)
    return out


def adapters_to_fp32(decoder: torch.nn.Module) -> None:
    """Adapters train as fp32 masters over a bf16 / NF4 base."""
    for m in lora_modules(decoder).values():
        m.lora_a.float()
        m.lora_b.float()
        if hasattr(m, "magnitude"):
            m.magnitude.data = m.magnitude.data.float()
