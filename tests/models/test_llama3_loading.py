"""Tiny Llama-3: torchtune's real checkpointers (HF and Meta layouts) and the tokenizer's chat layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchtune.training import FullModelHFCheckpointer, FullModelMetaCheckpointer

from medtune.models.llama3 import (
    IMAGE_TOKEN,
    encode_messages,
    image_token_id,
    llama3_from_hf_config,
    llama3_tokenizer,
)


def _tokenizer(assets: Path, with_json: bool = True):
    d = assets / "llama3_tiny"
    return llama3_tokenizer(
        str(d / "original" / "tokenizer.model"), str(d / "tokenizer.json") if with_json else None
    )


def _n_base(assets: Path) -> int:
    return sum(
        1
        for line in (assets / "llama3_tiny" / "original" / "tokenizer.model")
        .read_bytes()
        .splitlines()
        if line.strip()
    )


# ----------------------------------------------------------------------------- checkpointers
def test_hf_and_meta_checkpointers_give_identical_weights_and_logits(tiny_assets, tmp_path):
    d = tiny_assets / "llama3_tiny"
    hf = FullModelHFCheckpointer(
        checkpoint_dir=str(d),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "hf_out"),
    )
    meta = FullModelMetaCheckpointer(
        checkpoint_dir=str(d / "original"),
        checkpoint_files=["consolidated.00.pth"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "meta_out"),
    )
    sd_hf = hf.load_checkpoint()["model"]
    sd_meta = meta.load_checkpoint()["model"]
    assert sorted(sd_hf) == sorted(sd_meta)
    for k in sd_hf:
        torch.testing.assert_close(sd_hf[k], sd_meta[k], rtol=0, atol=0, msg=f"weight {k} differs")

    models = []
    for sd in (sd_hf, sd_meta):
        m = llama3_from_hf_config(d / "config.json")
        m.load_state_dict(sd, strict=True)  # every key of the torchtune decoder is present
        m.eval()
        models.append(m)
    cfg = json.loads((d / "config.json").read_text())
    assert models[0].tok_embeddings.num_embeddings == cfg["vocab_size"]
    x = torch.randint(
        0, cfg["vocab_size"] - 256, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = models[0](x), models[1](x)
    assert a.shape == (2, 12, cfg["vocab_size"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the weights are the trained ones, not a fresh init: a random-init model gives other logits
    fresh = llama3_from_hf_config(d / "config.json").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), a, atol=1e-3)


def test_hf_config_rope_scaling_selects_llama3_1(tiny_assets, tmp_path):
    cfg = json.loads((tiny_assets / "llama3_tiny" / "config.json").read_text())
    cfg["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m31 = llama3_from_hf_config(tmp_path / "config.json")
    m3 = llama3_from_hf_config(tiny_assets / "llama3_tiny" / "config.json")
    assert m31.layers[0].attn.pos_embeddings.is_cache_built
    # Llama-3.1 scaling changes the rotary frequencies of the low-frequency half
    assert not torch.allclose(
        m31.layers[0].attn.pos_embeddings.theta, m3.layers[0].attn.pos_embeddings.theta
    )


def test_hf_config_missing_key_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(ValueError, match="missing key 'num_hidden_layers'"):
        llama3_from_hf_config(tmp_path / "config.json")


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize(
    "text",
    [
        "Which side is the lesion on?",
        "  the CT scan\n\nshows a lesion. ",
        "Unicode: \u00e9\u00e8 \u4e2d\u6587 \u2192 ok",
        "",
    ],
)
def test_tokenizer_round_trips_text(tiny_assets, text):
    tok = _tokenizer(tiny_assets)
    ids = tok.encode(text, add_bos=False, add_eos=False)
    assert tok.decode(ids, truncate_at_eos=False, skip_special_tokens=False) == text


# The real Llama-3.1 layout of ids 128000..128255 (offsets from the first special id), written out
# independently of medtune and torchtune (whose table follows Llama-3.2).
LLAMA31_OFFSETS = {
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
# Llama-3.0's: no pad/eom/python_tag names, reserved tokens in their place.
LLAMA30_OFFSETS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eot_id|>": 9,
    **{
        f"<|reserved_special_token_{i}|>": off
        for i, off in enumerate([2, 3, 4, 5, 8, *range(10, 256)])
    },
}


def test_tokenizer_has_llama3_specials_after_base_vocab(tiny_assets):
    n = _n_base(tiny_assets)
    assert len(LLAMA31_OFFSETS) == 256 and sorted(LLAMA31_OFFSETS.values()) == list(range(256))
    for with_json in (True, False):  # from tokenizer.json, and laid out from the rank count alone
        tok = _tokenizer(tiny_assets, with_json=with_json)
        for name, off in LLAMA31_OFFSETS.items():
            assert tok.special_tokens[name] == n + off, name
        in_vocab = sorted(v for v in tok.special_tokens.values() if v < n + 256)
        assert in_vocab == list(
            range(n, n + 256)
        )  # exactly the 256 specials right after the base ranks
        assert (
            tok.bos_id == n and tok.eot_id == n + 9 and tok.eos_id == n + 1 and tok.pad_id == n + 4
        )
        assert image_token_id(tok) == n + 2
        # names torchtune needs that Llama-3 text models lack sit past the embedding table
        assert (
            min(tok.special_tokens[k] for k in ("<|image|>", "<|step_id|>", "<|video|>")) >= n + 256
        )
    cfg = json.loads((tiny_assets / "llama3_tiny" / "config.json").read_text())
    assert cfg["vocab_size"] == n + 256


@pytest.mark.parametrize("layout", ["3.0", "3.1"])
def test_tokenizer_reads_real_llama3_tokenizer_json_layouts(tiny_assets, tmp_path, layout):
    """A real Llama-3 / 3.1 tokenizer.json (added_tokens only) loads: torchtune's tokenizer also
    wants names these files lack (``<|step_id|>``, and for 3.0 the pad/eom/python_tag names)."""
    n = _n_base(tiny_assets)
    offsets = LLAMA30_OFFSETS if layout == "3.0" else LLAMA31_OFFSETS
    assert sorted(offsets.values()) == list(range(256))
    added = [{"id": n + off, "content": name, "special": True} for name, off in offsets.items()]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    tok = llama3_tokenizer(
        str(tiny_assets / "llama3_tiny" / "original" / "tokenizer.model"),
        str(tmp_path / "tokenizer.json"),
    )
    assert (tok.bos_id, tok.eos_id, tok.start_header_id, tok.end_header_id, tok.eot_id) == (
        n,
        n + 1,
        n + 6,
        n + 7,
        n + 9,
    )
    assert image_token_id(tok) == n + 2
    ids, _ = encode_messages(tok, [("user", ["Is there a lesion?"]), ("assistant", ["yes"])])
    assert tok.decode(ids, truncate_at_eos=False, skip_special_tokens=False).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIs there a lesion?<|eot_id|>"
    )


def test_placeholder_text_is_not_the_placeholder_id(tiny_assets):
    """User text that spells the special token must not inject image positions."""
    tok = _tokenizer(tiny_assets)
    ids = tok.encode(f"look {IMAGE_TOKEN} here", add_bos=False, add_eos=False)
    assert image_token_id(tok) not in ids
    assert not set(ids) & set(tok.special_tokens.values())


def test_encode_messages_emits_llama3_chat_layout_and_masks_assistant_only(tiny_assets):
    tok = _tokenizer(tiny_assets)
    img = image_token_id(tok)

    def enc(s):
        return tok.encode(s, add_bos=False, add_eos=False)

    nl2 = enc("\n\n")
    assert len(nl2) == 1  # one token, as in the real vocabulary (id 271)
    bos, sh, eh, eot = tok.bos_id, tok.start_header_id, tok.end_header_id, tok.eot_id
    msgs = [
        ("system", ["Answer briefly."]),
        ("user", [img, img, img, " Which side is the lesion on? "]),
        ("assistant", ["left"]),
        ("user", ["And the modality?"]),
        ("assistant", ["ct"]),
    ]
    ids, mask = encode_messages(tok, msgs)
    exp_ids: list[int] = [bos]
    exp_mask: list[bool] = [False]

    def turn(role, body, target):
        head = [sh, *enc(role), eh, *nl2]
        exp_ids.extend(head + body + [eot])
        exp_mask.extend([False] * len(head) + [target] * (len(body) + 1))

    turn("system", enc("Answer briefly."), False)
    turn(
        "user", [img, img, img, *enc(" Which side is the lesion on?")], False
    )  # outer end stripped
    turn("assistant", enc("left"), True)
    turn("user", enc("And the modality?"), False)
    turn("assistant", enc("ct"), True)
    assert ids == exp_ids
    assert mask == exp_mask
    text = tok.decode(
        [t for t in ids if t != img], truncate_at_eos=False, skip_special_tokens=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n Which side is the lesion on?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nleft<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the modality?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nct<|eot_id|>"
    )
    targets = [t for t, m in zip(ids, mask) if m]
    assert targets == [*enc("left"), eot, *enc("ct"), eot]

    gen_ids, gen_mask = encode_messages(tok, msgs[:3][:2], add_generation_prompt=True)
    assert gen_ids[-(3 + len(enc("assistant"))) :] == [sh, *enc("assistant"), eh, *nl2]
    assert not any(gen_mask)
