"""Chat formats, stop tokens and the image placeholder of every LLM family on the tiny generated
tokenizers: each format is checked against how its reference builds the ids (FastChat's whole
prompt string, MiniGPT-4's ``prompt_wrap`` segments, mistral-common's per-message calls, Qwen's
ChatML string)."""

from __future__ import annotations

import pytest

from medtune.models.llm import encode_messages, image_token_id
from medtune.models.llm.llama2 import VICUNA_SYSTEM, vicuna_tokenizer, xraygpt_tokenizer
from medtune.models.llm.mistral import mistral_tokenizer
from medtune.models.llm.placeholder import NO_RESERVED_TOKEN_ID, placeholder_id
from medtune.models.llm.qwen2_5 import QWEN_SYSTEM, qwen2_5_tokenizer
from medtune.testing.llm_families import _corpus, cached_tiny_llms

PH = NO_RESERVED_TOKEN_ID


@pytest.fixture(scope="module")
def llms():
    return cached_tiny_llms()


@pytest.fixture(scope="module")
def toks(llms):
    sp = str(llms / "vicuna_tiny" / "tokenizer.model")
    q = llms / "qwen2_5_tiny"
    return {
        "vicuna": vicuna_tokenizer(sp),
        "xraygpt": xraygpt_tokenizer(sp),
        "mistral": mistral_tokenizer(str(llms / "mistral_tiny" / "tokenizer.model")),
        "qwen": qwen2_5_tokenizer(
            str(q / "vocab.json"), str(q / "merges.txt"), str(q / "tokenizer.json")
        ),
    }


def _targets(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


def test_vicuna_v11_is_fastchat_prompt(toks):
    tok = toks["vicuna"]
    sp = tok._sp
    msgs = [
        ("user", ["What organ is shown?"]),
        ("assistant", ["The liver."]),
        ("user", ["Is it normal?"]),
    ]
    ids, mask = encode_messages(tok, msgs, add_generation_prompt=True)
    # FastChat: system + " USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:", <s> first
    first = f"{VICUNA_SYSTEM} USER: What organ is shown? ASSISTANT: The liver."
    n = 1 + len(sp.EncodeAsIds(first))
    assert ids[:n] == [tok.bos_id] + sp.EncodeAsIds(first)
    assert ids[n] == tok.eos_id
    assert tok.decode(ids[n + 1 :], skip_special_tokens=False) == "USER: Is it normal? ASSISTANT:"
    assert _targets(ids, mask) == sp.EncodeAsIds("The liver.") + [tok.eos_id]
    assert tok.stop_tokens == [tok.eos_id]


def test_minigpt4_is_prompt_wrap(toks):
    """XrayGPT's forward: <s> + p_before + image + p_after + (caption + '###'), each text
    segment tokenized on its own (add_special_tokens=False)."""
    tok = toks["xraygpt"]
    sp = tok._sp
    msgs = [("user", [PH, PH, "Describe the scan."]), ("assistant", ["No lesion."])]
    ids, mask = encode_messages(tok, msgs)
    want = (
        [tok.bos_id]
        + sp.EncodeAsIds("###Patient: <Img>")
        + [PH, PH]
        + sp.EncodeAsIds("</Img> Describe the scan. ###Doctor: ")
        + sp.EncodeAsIds("No lesion.###")
    )
    assert ids == want
    assert _targets(ids, mask) == sp.EncodeAsIds("No lesion.###")
    gen, _ = encode_messages(tok, msgs[:1], add_generation_prompt=True)
    assert gen == want[: len(gen)] and len(gen) == len(want) - len(sp.EncodeAsIds("No lesion.###"))
    # stops at </s> and at '###' as a sequence (every spelling), and decode cuts there
    assert tok.stop_tokens == [tok.eos_id]
    assert sp.EncodeAsIds("###") in tok.stop_sequences  # '▁###' (one id here)
    assert [sp.PieceToId("##"), sp.PieceToId("#")] in tok.stop_sequences  # MiniGPT-4's 2nd
    out = sp.EncodeAsIds("No lesion.###") + sp.EncodeAsIds("junk")
    assert tok.decode(out) == "No lesion."


def test_mistral_is_mistral_common_v1(toks):
    tok = toks["mistral"]
    sp = tok._sp
    msgs = [
        ("system", ["Be brief."]),
        ("user", ["What organ?"]),
        ("assistant", ["Liver."]),
        ("user", [PH, "Normal?"]),
    ]
    ids, mask = encode_messages(tok, msgs, add_generation_prompt=True)
    want = (
        [tok.bos_id]
        + sp.EncodeAsIds("[INST] What organ? [/INST]")
        + sp.EncodeAsIds("Liver.")
        + [tok.eos_id]
        + sp.EncodeAsIds("[INST] Be brief.\n\n")  # system joins the last user message
        + [PH]
        + tok._encode_text("Normal? [/INST]")
    )
    assert ids == want
    assert _targets(ids, mask) == sp.EncodeAsIds("Liver.") + [tok.eos_id]


def test_qwen_is_chatml_string(toks):
    tok = toks["qwen"]
    msgs = [("user", ["What organ is shown?"]), ("assistant", ["The liver."])]
    ids, mask = encode_messages(tok, msgs)
    text = (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat organ is shown?"
        "<|im_end|>\n<|im_start|>assistant\nThe liver.<|im_end|>\n"
    )
    assert ids == tok._tt.encode(text, add_bos=False, add_eos=False)
    assert _targets(ids, mask) == tok._tt.encode("The liver.", False, False) + [tok.im_end]
    assert tok.stop_tokens == [tok.im_end, tok.endoftext]
    assert tok.decode(tok.encode("The liver.") + [tok.im_end, 5, 6]) == "The liver."


@pytest.mark.parametrize("name", ["vicuna", "xraygpt", "mistral", "qwen"])
def test_placeholder_never_collides(toks, name):
    """Every id text can produce lies in [0, vocab); the placeholder (-200) does not, even for
    text that spells special tokens (Qwen's tokenizer turns '<|image_pad|>' into its id)."""
    tok = toks[name]
    assert image_token_id(tok) == PH == placeholder_id("qwen2_5") == placeholder_id("llama2")
    texts = [*_corpus(50), "<|image_pad|> <|im_end|> <s> </s> [INST] ###", "\u00e9\u4e2d\U0001f600"]
    for t in texts:
        ids, _ = encode_messages(tok, [("user", [t]), ("assistant", [t])])
        assert all(0 <= i < tok.vocab_size for i in ids), t
    ids, _ = encode_messages(tok, [("user", [PH, "<|image_pad|> here"])])
    assert ids.count(PH) == 1


def test_llama3_placeholder_unchanged():
    assert placeholder_id("llama3", 128_256) == 128_002
    with pytest.raises(ValueError, match="unknown LLM family"):
        placeholder_id("opt")
