"""Full and LoRA HF exports carry the tokenizer of every LLM family (:data:`TOKENIZER_FILES`):
exported in-process from the tiny families' HF checkpoints, the folders hold the base's tokenizer
files byte for byte, medtune's family tokenizer loads from the export and encodes as the base's,
and the weights round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from medtune.models.llm import decoder_from_hf_config, encode_messages
from medtune.models.llm.llama2 import vicuna_tokenizer
from medtune.models.llm.lora import lora_decoder_from_hf_config
from medtune.models.llm.mistral import mistral_tokenizer
from medtune.models.llm.qwen2_5 import qwen2_5_tokenizer
from medtune.models.lora import lora_settings
from medtune.testing.llm_families import cached_tiny_llms
from medtune.training.export import TOKENIZER_FILES, merge_lora, save_hf, save_peft_adapter

# family folder -> (its tokenizer files, a tokenizer from a folder)
FAMILIES = {
    "vicuna_tiny": (["tokenizer.model"], lambda d: vicuna_tokenizer(str(d / "tokenizer.model"))),
    "mistral_tiny": (["tokenizer.model"], lambda d: mistral_tokenizer(str(d / "tokenizer.model"))),
    "qwen2_5_tiny": (
        ["vocab.json", "merges.txt", "tokenizer.json"],
        lambda d: qwen2_5_tokenizer(
            str(d / "vocab.json"), str(d / "merges.txt"), str(d / "tokenizer.json")
        ),
    ),
}


def _tune_state(folder):
    """The tiny family's HF weights in torchtune names (what a recipe hands to the export)."""
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    model, family = decoder_from_hf_config(folder / "config.json")
    s = model.tok_embeddings.embedding_dim
    kw = dict(num_heads=model.layers[0].attn.num_heads, num_kv_heads=model.layers[0].attn.num_kv_heads, dim=s)  # fmt: skip
    hf = load_file(str(folder / "model.safetensors"))
    return (qwen2_hf_to_tune(hf, **kw) if family == "qwen2_5" else hf_to_tune(hf, **kw)), hf


def _same_tokenizer(base, out, files, make_tok):
    for name in files:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    msgs = [("user", ["What organ is shown?"]), ("assistant", ["The liver."])]
    assert encode_messages(make_tok(out), msgs) == encode_messages(make_tok(base), msgs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_export_has_the_family_tokenizer(name, tmp_path):
    base = cached_tiny_llms() / name
    files, make_tok = FAMILIES[name]
    assert set(files) <= set(TOKENIZER_FILES)
    state, hf = _tune_state(base)
    save_hf(state, tmp_path, base / "config.json")
    _same_tokenizer(base, tmp_path, files, make_tok)
    out = load_file(str(tmp_path / "model.safetensors"))
    assert out.keys() == hf.keys() and all(torch.equal(out[k], hf[k]) for k in hf)


def test_llama3_export_has_its_tokenizer(tiny_assets, tmp_path):
    """Llama-3: tokenizer.json and Meta's original/tokenizer.model (what medtune's reads)."""
    from medtune.models.llama3 import llama3_tokenizer

    base = tiny_assets / "llama3_tiny"
    state = _tune_state(base)[0]
    save_hf(state, tmp_path, base / "config.json")

    def make_tok(d):
        return llama3_tokenizer(str(d / "original/tokenizer.model"), str(d / "tokenizer.json"))

    _same_tokenizer(base, tmp_path, ["tokenizer.json", "original/tokenizer.model"], make_tok)


def test_lora_exports_have_the_tokenizer(tmp_path):
    """Mistral with LoRA: the PEFT adapter folder and the merged HF folder both carry it."""
    base = cached_tiny_llms() / "mistral_tiny"
    files, make_tok = FAMILIES["mistral_tiny"]
    torch.manual_seed(0)
    dec = lora_decoder_from_hf_config(base / "config.json", lora_rank=2, lora_alpha=4.0)
    state = {k: v.detach() for k, v in dec.state_dict().items()}
    save_peft_adapter(state, lora_settings(dec), tmp_path / "adapter", base / "config.json")
    _same_tokenizer(base, tmp_path / "adapter", files, make_tok)
    assert not (tmp_path / "adapter" / "config.json").exists()  # a PEFT folder, not a model
    save_hf(merge_lora(state, lora_settings(dec)), tmp_path / "merged", base / "config.json")
    _same_tokenizer(base, tmp_path / "merged", files, make_tok)
