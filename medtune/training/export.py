"""Exports of a fine-tuned Llama-3 in the layouts other tools load.

- :func:`save_hf`: the LLM as HF ``LlamaForCausalLM`` safetensors (``model.safetensors`` +
  ``config.json``, plus the base folder's tokenizer/generation files when present: every family's,
  :data:`TOKENIZER_FILES`), converted with torchtune's ``convert_weights.tune_to_hf`` (q/k rows
  permuted back to HF's rotary layout; Qwen2's converter for q/k/v biases).
- :func:`save_peft_adapter`: LoRA / DoRA adapters in PEFT layout (``adapter_model.safetensors`` +
  ``adapter_config.json``, plus the base's tokenizer files), loadable with
  ``peft.PeftModel.from_pretrained(hf_model, folder)``.
- :func:`merge_lora`: base + ``alpha / r * B @ A`` (DoRA: rescaled by the magnitude) folded into the
  base weights (torchtune's ``get_merged_lora_ckpt``), giving a plain Llama-3 state dict.

State dicts here use torchtune's decoder names (``layers.0.attn.q_proj.weight``), without
MedVLM's ``decoder.`` prefix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LLM_DIR = "llm"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
HF_MODEL_FILE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The tokenizer files of every LLM family's HF folder (the ones present are copied):
# Llama-3: tokenizer.json (+ Meta's tiktoken original/tokenizer.model, which medtune's own
# tokenizer reads); Llama-2 / Vicuna, Mistral: the sentencepiece tokenizer.model (+ added_tokens.json
# where a fine-tune added tokens); Qwen2.5: vocab.json + merges.txt + tokenizer.json.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "original/tokenizer.model",
)
_COPIED = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _shape(hf_config: str | Path) -> dict:
    """The head layout of an HF ``config.json``, as the keyword arguments of torchtune's
    ``convert_weights`` converters (``num_heads num_kv_heads dim head_dim``)."""
    cfg = json.loads(Path(hf_config).read_text())
    from medtune.models.llama3 import head_layout

    # a LLaVA folder (medtune.models.llava): its LLM's config
    return head_layout(cfg.get("text_config", cfg))


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"format": "pt"},
    )
    os.replace(tmp, path)


def is_adapter_key(name: str) -> bool:
    """torchtune's LoRA/DoRA parameter names: ``...lora_a.weight``, ``...lora_b.weight``, ``...magnitude``."""
    return "lora_" in name or name.endswith("magnitude")


def save_hf(state: dict[str, torch.Tensor], out_dir: str | Path, hf_config: str | Path) -> Path:
    """Write a torchtune Llama-3 state dict as an HF checkpoint folder.

    Args:
        state: torchtune names -> tensors (adapter keys, if any, are dropped: merge first).
        out_dir: folder to write (``model.safetensors`` + the base folder's ``config.json`` etc.).
        hf_config: the base model's HF ``config.json`` (gives the head layout; copied along with
            the tokenizer/generation files beside it).

    Returns:
        The ``model.safetensors`` path.
    """
    from torchtune.models.convert_weights import tune_to_hf

    s = _shape(hf_config)
    base = {k: v for k, v in state.items() if not is_adapter_key(k)}
    if any(k.endswith("attn.q_proj.bias") for k in base):  # Qwen2 / 2.5: q/k/v biases
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        tied = bool(json.loads(Path(hf_config).read_text()).get("tie_word_embeddings", False))
        hf = qwen2_tune_to_hf(base, **s, tie_word_embeddings=tied)
    else:  # Llama-3, Llama-2 / Vicuna, Mistral share the layout
        hf = tune_to_hf(base, **s)
    out = Path(out_dir)
    _save(hf, out / HF_MODEL_FILE)
    copy_beside(hf_config, out, _COPIED)
    return out / HF_MODEL_FILE


def copy_beside(hf_config: str | Path, out_dir: str | Path, names=TOKENIZER_FILES) -> list[str]:
    """Copy the files ``names`` (relative paths) found beside ``hf_config`` into ``out_dir``.

    Returns:
        The names copied.
    """
    base, out, done = Path(hf_config).parent, Path(out_dir), []
    for name in names:
        src = base / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / name)
            done.append(name)
    return done


def save_peft_adapter(
    state: dict[str, torch.Tensor],
    settings: dict,
    out_dir: str | Path,
    hf_config: str | Path,
    base_model: str | None = None,
) -> Path:
    """Write the adapters of a torchtune LoRA/DoRA Llama-3 in PEFT layout.

    Args:
        state: torchtune names -> tensors; only adapter keys are used (``lora_a`` [r, in],
            ``lora_b`` [out, r], ``magnitude`` [out]).
        settings: ``{"r", "lora_alpha", "target_modules" (torchtune names), "use_dora"}``
            (:func:`medtune.models.lora.lora_settings`).
        out_dir: folder to write.
        hf_config: the base model's HF ``config.json`` (head layout for the q/k permutation).
        base_model: ``base_model_name_or_path`` recorded in the config.

    Returns:
        The folder.
    """
    from torchtune.models.convert_weights import (
        tune_to_peft_adapter_config,
        tune_to_peft_adapter_weights,
    )

    s = _shape(hf_config)
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    if not adapters:
        raise ValueError("save_peft_adapter: the state dict holds no LoRA/DoRA weights")
    weights = tune_to_peft_adapter_weights(adapters, **s)
    _permute_dora_magnitudes(weights, s)
    cfg = tune_to_peft_adapter_config(
        {
            "r": settings["r"],
            "lora_alpha": settings["lora_alpha"],
            "target_modules": list(settings["target_modules"]),
        },
        base_model,
    )
    cfg.update(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        use_dora=bool(settings.get("use_dora", False)),
        lora_dropout=float(settings.get("lora_dropout", 0.0)),
        bias="none",
        fan_in_fan_out=False,
        inference_mode=True,
    )
    out = Path(out_dir)
    _save(weights, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    copy_beside(hf_config, out)  # the base's tokenizer: the adapter folder loads on its own
    return out


def _permute_dora_magnitudes(weights: dict[str, torch.Tensor], shape: dict) -> None:
    """Put q/k DoRA magnitudes [out] into HF's rotary row order, in place.

    torchtune's ``tune_to_peft_adapter_weights`` permutes the q/k ``lora_B`` rows from torchtune's
    interleaved rotary layout to HF's half-split one but leaves the per-row magnitudes in torchtune's
    order, so a DoRA adapter would scale the wrong rows in PEFT.
    """
    head_dim = shape["head_dim"] or shape["dim"] // shape["num_heads"]
    for key, value in weights.items():
        if key.endswith("lora_magnitude_vector") and (".q_proj." in key or ".k_proj." in key):
            n_heads = shape["num_heads"] if ".q_proj." in key else shape["num_kv_heads"]
            weights[key] = value.view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def merge_lora(state: dict[str, torch.Tensor], settings: dict) -> dict[str, torch.Tensor]:
    """Fold the adapters into the base weights (a copy; ``state`` is untouched).

    Args:
        state: torchtune names -> tensors, base weights (dequantized if NF4) and adapters.
        settings: ``{"r", "lora_alpha"}``.

    Returns:
        A plain Llama-3 state dict (no adapter keys), base dtype kept.
    """
    from torchtune.modules.peft import get_merged_lora_ckpt

    dtypes = {k: v.dtype for k, v in state.items()}
    work = {k: v.float().clone() for k, v in state.items()}
    merged = get_merged_lora_ckpt(work, rank=settings["r"], alpha=settings["lora_alpha"])
    return {k: v.to(dtypes[k]) for k, v in merged.items()}
