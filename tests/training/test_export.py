"""HF / PEFT / merged exports of a torchtune LoRA or DoRA Llama-3 give the same logits in
``transformers`` + ``peft`` as the torchtune model (tiny Llama-3, random non-zero adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.training.export import merge_lora, save_hf, save_peft_adapter

MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _base_state(assets: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune

    cfg = json.loads((assets / "llama3_tiny" / "config.json").read_text())
    hf = load_file(str(assets / "llama3_tiny" / "model.safetensors"))
    return hf_to_tune(
        hf,
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        dim=cfg["hidden_size"],
    )


def _lora_decoder(assets: Path, use_dora: bool, seed: int = 0):
    """Tiny LoRA/DoRA decoder with the real base weights and random, non-zero adapters."""
    from medtune.models.lora import lora_llama3_from_hf_config, lora_settings

    dec = lora_llama3_from_hf_config(
        assets / "llama3_tiny" / "config.json",
        MODULES,
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        lora_rank=4,
        lora_alpha=8.0,
        use_dora=use_dora,
    )
    missing, unexpected = dec.load_state_dict(_base_state(assets), strict=False)
    assert not unexpected and all("lora_" in k or "magnitude" in k for k in missing)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("magnitude"):
                w = dict(dec.named_parameters())[name.removesuffix("magnitude") + "weight"]
                p.copy_(torch.linalg.norm(w, dim=1) * (1 + 0.2 * torch.rand(p.shape, generator=g)))
    return dec.eval(), lora_settings(dec)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_and_merged_match_torchtune(tiny_assets, tmp_path, tokens, use_dora):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    dec, settings = _lora_decoder(tiny_assets, use_dora)
    assert settings["use_dora"] is use_dora and settings["r"] == 4 and settings["lora_alpha"] == 8.0
    assert sorted(settings["target_modules"]) == sorted([*MODULES, "w1", "w2", "w3", "output"])
    with torch.no_grad():
        ours = dec(tokens)  # [b, s, vocab]
    state = {k: v.detach() for k, v in dec.state_dict().items()}
    hf_cfg = tiny_assets / "llama3_tiny" / "config.json"
    save_peft_adapter(
        state, settings, tmp_path / "adapter", hf_cfg, base_model=str(tiny_assets / "llama3_tiny")
    )
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is use_dora and "lm_head" in adapter_cfg["target_modules"]

    base = LlamaForCausalLM.from_pretrained(
        str(tiny_assets / "llama3_tiny"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert (base(tokens).logits - ours).abs().max() > 1e-2  # the adapters matter
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, ours, atol=1e-4, rtol=1e-4)

    merged = merge_lora(state, settings)
    assert not any("lora_" in k or "magnitude" in k for k in merged)
    assert set(state) - set(merged) and all(
        torch.equal(state[k], v) for k, v in state.items() if "lora" in k
    )
    save_hf(merged, tmp_path / "merged", hf_cfg)
    assert (tmp_path / "merged" / "config.json").is_file()
    hf_merged = LlamaForCausalLM.from_pretrained(
        str(tmp_path / "merged"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(tokens).logits, ours, atol=1e-4, rtol=1e-4)


def test_save_hf_round_trip_is_exact(tiny_assets, tmp_path):
    from safetensors.torch import load_file

    save_hf(_base_state(tiny_assets), tmp_path, tiny_assets / "llama3_tiny" / "config.json")
    ours, ref = (
        load_file(str(tmp_path / "model.safetensors")),
        load_file(str(tiny_assets / "llama3_tiny" / "model.safetensors")),
    )
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_save_peft_adapter_needs_adapters(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_peft_adapter(
            _base_state(tiny_assets),
            {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]},
            tmp_path,
            tiny_assets / "llama3_tiny" / "config.json",
        )
