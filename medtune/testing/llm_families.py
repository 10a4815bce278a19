"""Tiny Llama-2 / Vicuna, Mistral and Qwen2.5 models and tokenizers, generated (no downloads).

``make_tiny_llms(out)`` writes, each in the HF download layout (``config.json``,
``model.safetensors``, tokenizer files) that torchtune's ``FullModelHFCheckpointer`` reads:

- ``vicuna_tiny/``: a Llama-2-shaped decoder (``num_kv_heads == num_heads`` as Llama-2-7B) and a
  sentencepiece ``tokenizer.model`` trained here on the synthetic corpus with Llama-2's settings
  (BPE, byte fallback, ``<unk>`` 0 / ``<s>`` 1 / ``</s>`` 2, no pad, dummy prefix, digits split);
- ``mistral_tiny/``: a Mistral-shaped decoder (GQA) with the same sentencepiece model;
- ``mistral_tiny256/``: the same at width 256, one layer, for QLoRA (torchao's NF4 needs 256-wide
  scaler blocks);
- ``qwen2_5_tiny/``: a Qwen2-shaped decoder (q/k/v biases, an embedding table padded past the
  tokenizer's ids, as Qwen's) and a byte-level BPE ``vocab.json`` / ``merges.txt`` with Qwen2.5's
  22 special tokens after the base ids (``tokenizer.json`` ``added_tokens``), as the real layout.

Weights are random: the family tests check that every recipe runs, stops and reloads, not what the
tiny LLM knows. The folder is marked complete with ``.complete`` and reused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

TINY_SHAPE = dict(embed_dim=64, num_layers=2, num_heads=4, intermediate_dim=128, max_seq_len=512)
# Qwen2.5's special tokens by offset from <|endoftext|> (151643 in the real vocabulary).
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
_FORMAT_TEXT = (
    "USER: ASSISTANT: ###Human: ###Assistant: ###Patient: ###Doctor: <Img> </Img> [INST] [/INST] "
    "A chat between a curious user and an artificial intelligence assistant. system user assistant"
)


def _corpus(n: int = 600) -> list[str]:
    from medtune.testing.synthetic import text_qa_corpus

    lines = [f"{d} {q} {a}" for d, q, a in text_qa_corpus(n, seed=3)]
    return lines + [_FORMAT_TEXT] * 20


def write_sentencepiece(path: Path, vocab_size: int = 512, corpus: list[str] | None = None) -> int:
    """Train a tiny sentencepiece model with Llama-2's settings (on ``corpus``, default the
    synthetic one); returns its vocabulary size."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or _corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return vocab_size


def _bytes_to_unicode() -> dict[int, str]:
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def write_qwen_tokenizer(folder: Path, n_words: int = 80) -> tuple[int, int]:
    """Write a byte-level BPE ``vocab.json`` + ``merges.txt`` (prefix merges of frequent words)
    and ``tokenizer.json`` with Qwen2.5's special tokens after the base ids.

    Returns:
        ``(first special id, tokenizer vocabulary size)``.
    """
    from collections import Counter

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges: list[tuple[str, str]] = []
    words = Counter(w for line in _corpus() for w in line.split())
    for word, _ in words.most_common(n_words):
        for form in (word, " " + word):
            chars = [b2u[b] for b in form.encode()]
            tok = chars[0]
            for c in chars[1:]:
                if tok + c not in vocab:
                    merges.append((tok, c))
                    vocab[tok + c] = len(vocab)
                tok = tok + c
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    first = len(vocab)
    added = [{"id": first + i, "content": n, "special": True} for i, n in enumerate(QWEN_SPECIALS)]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}, indent=1))
    return first, first + len(QWEN_SPECIALS)


def _save_hf(folder: Path, model: torch.nn.Module, hf_config: dict, family: str) -> None:
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    kw = dict(
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
    )
    hf = qwen2_tune_to_hf(sd, **kw) if family == "qwen2_5" else tune_to_hf(sd, **kw)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))


def _hf_config(model_type: str, vocab: int, kv: int, rope: float, **extra) -> dict:
    c = {**TINY_SHAPE, **extra.pop("shape", {})}
    return {
        "model_type": model_type,
        "hidden_size": c["embed_dim"],
        "intermediate_size": c["intermediate_dim"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": kv,
        "num_hidden_layers": c["num_layers"],
        "vocab_size": vocab,
        "max_position_embeddings": c["max_seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": rope,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **extra,
    }


def make_tiny_llms(out: str | Path, seed: int = 0) -> Path:
    """Write the three tiny families under ``out`` (reused when complete); returns ``out``."""
    from medtune.models.llm import decoder_from_hf_config

    out = Path(out)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sp_vocab = write_sentencepiece(out / "vicuna_tiny" / "tokenizer.model")
    for name in ("mistral_tiny", "mistral_tiny256"):
        (out / name).mkdir(exist_ok=True)
        (out / name / "tokenizer.model").write_bytes(
            (out / "vicuna_tiny" / "tokenizer.model").read_bytes()
        )
    first, n_tok = write_qwen_tokenizer(out / "qwen2_5_tiny")
    qwen_rows = -(-n_tok // 64) * 64  # padded past the tokenizer's ids, as Qwen's tables are
    heads = TINY_SHAPE["num_heads"]
    configs = {
        "vicuna_tiny": ("llama2", _hf_config("llama", sp_vocab, heads, 10_000.0)),
        "mistral_tiny": ("mistral", _hf_config("mistral", sp_vocab, 2, 1_000_000.0)),
        "mistral_tiny256": (
            "mistral",
            _hf_config(
                "mistral",
                sp_vocab,
                2,
                1_000_000.0,
                shape=dict(embed_dim=256, num_layers=1, intermediate_dim=512),
            ),
        ),
        "qwen2_5_tiny": (
            "qwen2_5",
            _hf_config(
                "qwen2", qwen_rows, 2, 1_000_000.0, bos_token_id=first, eos_token_id=first + 2
            ),
        ),
    }
    for i, (name, (family, cfg)) in enumerate(configs.items()):
        folder = out / name
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        torch.manual_seed(seed + i)
        model, got = decoder_from_hf_config(folder / "config.json")
        assert got == family, (name, got)
        _save_hf(folder, model, cfg, family)
    (out / ".complete").write_text("ok\n")
    return out


def cached_tiny_llms() -> Path:
    """Build (or reuse) the tiny families under ``$MEDTUNE_TEST_ASSETS`` (or the temp folder),
    keyed by the content of the modules that write them, and flock'd across test processes."""
    import fcntl
    import hashlib
    import os
    import shutil
    import tempfile

    import medtune.models.llm as llm_pkg
    import medtune.testing.synthetic as synthetic

    h = hashlib.sha256()
    for f in (
        Path(__file__),
        Path(synthetic.__file__),
        *Path(llm_pkg.__file__).parent.glob("*.py"),
    ):
        h.update(f.read_bytes())
    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    base.mkdir(parents=True, exist_ok=True)
    out = base / f"llms-{h.hexdigest()[:16]}"
    with open(base / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists() and not (out / ".complete").exists():
            shutil.rmtree(out)  # a half-written folder from a killed build
        return make_tiny_llms(out)
