"""Tiny random transformers VLMs built from config (no download): a LLaVA and a Qwen2-VL folder.

Each folder is what ``save_pretrained`` writes for a hub model (``config.json``,
``model.safetensors``, tokenizer files, processor files with a chat template), so ``model: hf``
loads it exactly as it loads a real one with ``AutoProcessor`` +
``AutoModelForImageTextToText``. The tokenizer is a word-level ``tokenizers`` model over a small
vocabulary (the words of the benchmark fixtures' prompts, the letters, the special tokens each
processor needs); unknown words map to ``<unk>``. Widths are a few dozen, so a folder is built in
well under a second.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_tiny_hf_llava", "make_tiny_hf_qwen2_vl", "make_tiny_hf_vlms"]

_WORD_TEXT = (
    "question options answer with the option's letter from given choices directly a b c d e "
    "is there lesion this normal tissue what organ shown stain used image abnormal how many "
    "nodules are seen modality ct mri x-ray ultrasound yes no liver left right lung user "
    "assistant system : . , ? '"
)
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        {w.lower() for w in _WORD_TEXT.split()} | set("abcdefghijklmnopqrstuvwxyz0123456789")
    )
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast, len(vocab)


def make_tiny_hf_llava(out: str | Path, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP ViT 32 px, patch 8, tiny Llama) folder."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out)
    if (out / ".complete").is_file():
        return out
    tok, vocab = _tokenizer(["<image>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                                eos_token_id=3),
        image_token_index=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)  # fmt: skip
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / ".complete").write_text("ok\n")
    return out


def make_tiny_hf_qwen2_vl(out: str | Path, seed: int = 0) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` folder (images resized to 56 px: 4x4 patches
    of 14, merged 2x2 -> 4 image tokens)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    out = Path(out)
    if (out / ".complete").is_file():
        return out
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]  # fmt: skip
    tok, vocab = _tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 512,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                     "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                               temporal_patch_size=2)  # fmt: skip
    kwargs = {}
    try:
        from transformers import Qwen2VLVideoProcessor

        kwargs["video_processor"] = Qwen2VLVideoProcessor()
    except ImportError:  # older transformers: no video processor argument
        pass
    proc = Qwen2VLProcessor(
        image_processor=ip, tokenizer=tok, chat_template=_QWEN_TEMPLATE, **kwargs
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / ".complete").write_text("ok\n")
    return out


def make_tiny_hf_vlms(out: str | Path) -> Path:
    """Both folders under ``out``: ``llava/`` and ``qwen2_vl/``."""
    out = Path(out)
    make_tiny_hf_llava(out / "llava")
    make_tiny_hf_qwen2_vl(out / "qwen2_vl")
    return out
