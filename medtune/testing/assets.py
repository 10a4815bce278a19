"""Tiny, generated stand-ins for the real downloads, in the real file layouts.

``make_tiny_assets(out)`` writes (and :func:`tiny_assets` caches per process)::

    out/llama3_tiny/                     # same layout as a Meta-Llama-3-8B-Instruct HF download
        config.json  model.safetensors  tokenizer.json  generation_config.json
        original/consolidated.00.pth  original/params.json  original/tokenizer.model
    out/llama3_tiny256/                  # a 256-wide, 1-layer, random Llama-3 (HF layout) that
        config.json  model.safetensors   # torchao NF4 can quantize (QLoRA demo); same tokenizer
    out/tiny_clip/                       # open_clip hub layout, like BiomedCLIP's HF repo
        open_clip_config.json  open_clip_pytorch_model.bin
    out/tiny_slake/Slake1.0/             # synthetic SLAKE-schema VQA set (see medtune.testing.synthetic)

Nothing here downloads. The tokenizer is a real tiktoken rank file (byte-level BPE ranks, base64
per line) with Llama-3's 256 special tokens laid out right after the base vocabulary, so
torchtune's ``Llama3Tokenizer`` and checkpointers load everything exactly as they load the real
files.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the synthetic data and chat format use get whole-word BPE merges so sequences stay short.
_WORDS = [
    "user",
    "assistant",
    "system",
    "the",
    "a",
    "an",
    "is",
    "of",
    "in",
    "on",
    "which",
    "what",
    "where",
    "side",
    "organ",
    "lesion",
    "image",
    "scan",
    "modality",
    "shown",
    "this",
    "there",
    "yes",
    "no",
    "left",
    "right",
    "upper",
    "lower",
    "lung",
    "liver",
    "kidney",
    "brain",
    "heart",
    "spleen",
    "ct",
    "mri",
    "x",
    "ray",
    "xray",
    "t1",
    "t2",
    "abnormal",
    "normal",
    "does",
    "contain",
    "have",
    "has",
    "any",
    "abnormality",
    "answer",
    "with",
    "single",
    "word",
    "or",
    "phrase",
    "describe",
    "medical",
    "picture",
    "question",
    "location",
    "located",
    "appear",
    "appears",
    "region",
    "found",
    "bright",
    "dark",
    "spot",
    "circle",
    "square",
    "shape",
    "how",
    "many",
    "one",
    "two",
    "three",
    "zero",
    "none",
]

TINY_LLAMA = dict(
    embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_dim=128, max_seq_len=512
)
TINY_CLIP = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, embed_dim=48)


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the generated assets."""

    root: Path

    @property
    def llama_dir(self) -> Path:
        return self.root / "llama3_tiny"

    @property
    def tokenizer_path(self) -> Path:
        return self.llama_dir / "original" / "tokenizer.model"

    @property
    def tokenizer_json(self) -> Path:
        return self.llama_dir / "tokenizer.json"

    @property
    def clip_dir(self) -> Path:
        return self.root / "tiny_clip"

    @property
    def slake_dir(self) -> Path:
        return self.root / "tiny_slake" / "Slake1.0"


def _bpe_ranks() -> list[bytes]:
    ranks: list[bytes] = [bytes([i]) for i in range(256)]
    seen = set(ranks)

    def add(tok: bytes) -> None:
        if tok not in seen:
            seen.add(tok)
            ranks.append(tok)

    add(b"\n\n")
    for word in _WORDS:
        for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            b = form.encode()
            # every prefix is a token, so BPE can reach the whole word through pairwise merges
            for end in range(2, len(b) + 1):
                add(b[:end])
    return ranks


def write_tokenizer(llama_dir: Path) -> int:
    """Write ``original/tokenizer.model`` (tiktoken) and ``tokenizer.json`` (HF added_tokens).

    Returns:
        The full vocabulary size (base ranks + 256 specials), as the model's embedding needs.
    """
    from medtune.models.llama3 import special_tokens_for_base_vocab

    ranks = _bpe_ranks()
    (llama_dir / "original").mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {i}" for i, tok in enumerate(ranks)]
    (llama_dir / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    special = special_tokens_for_base_vocab(len(ranks))
    special.pop("<|image|>")  # Llama-3 / 3.1 text models have no <|image|> token
    added = [
        {"id": i, "content": name, "special": True}
        for name, i in sorted(special.items(), key=lambda kv: kv[1])
    ]
    (llama_dir / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "added_tokens": added}, indent=1)
    )
    return len(ranks) + 256


def pretrain_on_text(
    model: torch.nn.Module,
    llama_dir: Path,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Teach the tiny Llama-3 the synthetic task from text (image described in words).

    A real Llama-3-Instruct already knows medicine; a random tiny one knows nothing, and no amount of
    vision tuning can steer a frozen random network. This makes the tiny frozen LLM a fair stand-in.

    Returns:
        The final training loss (answer tokens).
    """
    import torch.nn.functional as F

    from medtune.models.llama3 import encode_messages, llama3_tokenizer
    from medtune.testing.synthetic import text_qa_corpus

    tok = llama3_tokenizer(
        str(llama_dir / "original" / "tokenizer.model"), str(llama_dir / "tokenizer.json")
    )
    rows = []
    for desc, q, a in text_qa_corpus(2000, seed=seed + 1):
        ids, mask = encode_messages(tok, [("user", [desc + " " + q]), ("assistant", [a])])
        rows.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        n = max(len(rows[i][0]) for i in idx)
        x = torch.full((batch_size, n), tok.pad_id)
        y = torch.full((batch_size, n), -100)
        for b, i in enumerate(idx):
            ids, lab = rows[i]
            x[b, : len(ids)] = torch.tensor(ids)
            y[b, : len(lab)] = torch.tensor(lab)
        logits = model(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def write_llama(llama_dir: Path, vocab_size: int, seed: int = 0, pretrain_steps: int = 150) -> None:
    """Write a tiny Llama-3 (pre-trained on text, see :func:`pretrain_on_text`) in HF
    (``model.safetensors``) and Meta (``original/``) layouts."""
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf, tune_to_meta

    from medtune.models.llama3 import llama3_tiny

    torch.manual_seed(seed)
    model = llama3_tiny(vocab_size=vocab_size, **TINY_LLAMA)
    if pretrain_steps:
        pretrain_on_text(model, llama_dir, steps=pretrain_steps, seed=seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    c = TINY_LLAMA
    hf = tune_to_hf(
        sd, num_heads=c["num_heads"], num_kv_heads=c["num_kv_heads"], dim=c["embed_dim"]
    )
    save_file(
        {k: v.contiguous() for k, v in hf.items()},
        str(llama_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["embed_dim"],
        "intermediate_size": c["intermediate_dim"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "num_hidden_layers": c["num_layers"],
        "vocab_size": vocab_size,
        "max_position_embeddings": c["max_seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": vocab_size - 256,
        "eos_token_id": vocab_size - 256 + 9,
        "torch_dtype": "float32",
    }
    (llama_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (llama_dir / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": vocab_size - 256,
                "eos_token_id": [vocab_size - 256 + 1, vocab_size - 256 + 9],
            }
        )
    )
    meta = tune_to_meta(sd)
    torch.save(meta, llama_dir / "original" / "consolidated.00.pth")
    params = {
        "dim": c["embed_dim"],
        "n_layers": c["num_layers"],
        "n_heads": c["num_heads"],
        "n_kv_heads": c["num_kv_heads"],
        "vocab_size": vocab_size,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    (llama_dir / "original" / "params.json").write_text(json.dumps(params, indent=2))


def write_llama_256(out_dir: Path, like: Path, seed: int = 0) -> None:
    """Write a random 256-wide, 1-layer Llama-3 in HF layout with ``like``'s vocabulary.

    torchao's NF4 quantizes in blocks of 64 values with scalers in blocks of 256, so QLoRA needs
    weights whose sizes are multiples of 256; the 64-wide ``llama3_tiny`` cannot be quantized.
    """
    from medtune.models.llama3 import llama3_tiny
    from medtune.training.export import save_hf

    cfg = json.loads((like / "config.json").read_text())
    cfg.update(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = llama3_tiny(
        cfg["vocab_size"],
        embed_dim=256,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=512,
        max_seq_len=cfg["max_position_embeddings"],
    )
    save_hf(model.state_dict(), out_dir, out_dir / "config.json")


def write_open_clip(clip_dir: Path, seed: int = 0) -> None:
    """Write a tiny open_clip model in hub layout (``open_clip_config.json`` + weights).

    Like BiomedCLIP's repo: a full CLIP (vision + text tower) whose preprocess config gives the CLIP
    mean/std; medtune loads only ``visual.*`` from it.
    """
    import open_clip

    c = TINY_CLIP
    model_cfg = {
        "embed_dim": c["embed_dim"],
        "vision_cfg": {
            "image_size": c["image_size"],
            "patch_size": c["patch_size"],
            "width": c["width"],
            "layers": c["layers"],
            "head_width": c["width"] // c["heads"],
        },
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    clip_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    (clip_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), clip_dir / "open_clip_pytorch_model.bin")


def make_tiny_assets(
    out: str | Path, *, n_train: int = 384, n_val: int = 96, n_test: int = 96, seed: int = 0
) -> TinyAssets:
    """Write all tiny assets under ``out`` (idempotent: an existing complete folder is reused)."""
    from medtune.testing.synthetic import write_synthetic_slake

    assets = TinyAssets(Path(out))
    done = assets.root / ".complete"
    if done.exists():
        return assets
    assets.root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(assets.llama_dir)
    write_llama(assets.llama_dir, vocab, seed=seed)
    write_llama_256(assets.root / "llama3_tiny256", assets.llama_dir, seed=seed)
    write_open_clip(assets.clip_dir, seed=seed)
    write_synthetic_slake(assets.slake_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    done.write_text("ok\n")
    return assets
