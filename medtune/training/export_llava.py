"""``medtune export hf``: a trained MedVLM as a transformers ``LlavaForConditionalGeneration`` folder.

The folder holds what ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` need, with no medtune import:

- ``config.json``: a ``llava`` config whose ``text_config`` is the run's LLM ``config.json`` and
  whose ``vision_config`` rebuilds the tower exactly (``clip_vision_model`` for open_clip ViTs,
  ``vit`` for timm ViTs such as BiomedCLIP's), ``vision_feature_layer`` = the encoder's
  ``feature_layer``, strategy ``default``, ``image_token_index`` = medtune's placeholder id;
- ``model.safetensors`` (shards above 5 GB), written by transformers' own ``save_pretrained``;
- the processor: an image processor with the tower's size, mean, std and interpolation (resize
  mode ``squash`` or ``crop``), the tokenizer (the LLM folder's ``tokenizer.json``, or the
  tiktoken file converted), and a chat template that reproduces medtune's Llama-3 prompt
  (images first in the user turn, the turn's text stripped at its ends);
- ``README.md``: a model card naming the datasets and, when an ``eval`` run is given, its metrics.

Serving at scale: vLLM's LLaVA loader takes ``clip_vision_model`` towers with a ``gelu``
projector; a ``vit`` tower or a ``linear`` projector (act ``linear``) runs there with
``--model-impl transformers``. The weight names are mapped in :mod:`medtune.models.convert.hf_llava`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medtune.models.convert.hf_llava import (
    ExportError,
    _tower,
    check_exportable,
    llm_to_hf,
    projector_to_hf,
    vision_to_hf,
)
from medtune.models.llama3 import IMAGE_TOKEN, head_layout

# Llama-3's pre-tokenizer pattern (tiktoken's cl100k-style split used by Meta's tokenizer.model).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# medtune's Llama-3 prompt (medtune.models.llama3.encode_messages): images first in the turn,
# the turn's text stripped at its outer ends (an image first keeps the text's leading space),
# <|eot_id|> closing each turn. @IMAGE@ becomes the
# placeholder token's text (the processor expands it to one token per patch).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for item in message['content'] if item['type'] == 'image' %}{{- '@IMAGE@' }}{%- endfor %}"
    "{%- set ns = namespace(text='') %}"
    "{%- for item in message['content'] if item['type'] == 'text' %}"
    "{%- set ns.text = ns.text + item['text'] %}{%- endfor %}"
    "{%- if message['content'] | selectattr('type', 'equalto', 'image') | list %}"
    "{{- ns.text.rstrip() }}{%- else %}{{- ns.text | trim }}{%- endif %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4}


def vision_config(enc) -> dict:
    """The transformers ``vision_config`` that rebuilds ``enc``'s tower."""
    module, kind, n = _tower(enc)
    size = enc.transform["image_size"]
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ExportError(f"image size {size}: transformers' LLaVA towers take square images")
        size = size[0]
    if kind == "open_clip_vit":
        blk = module.transformer.resblocks[0]
        act = type(blk.mlp.gelu).__name__
        return {
            "model_type": "clip_vision_model",
            "hidden_size": module.conv1.out_channels,
            "intermediate_size": blk.mlp.c_fc.out_features,
            "num_hidden_layers": n,
            "num_attention_heads": blk.attn.num_heads,
            "image_size": size,
            "patch_size": module.patch_size[0],
            "hidden_act": "quick_gelu" if act == "QuickGELU" else "gelu",
            "layer_norm_eps": blk.ln_1.eps,
            "projection_dim": module.output_dim,
        }
    blk = module.blocks[0]
    return {
        "model_type": "vit",
        "hidden_size": module.embed_dim,
        "intermediate_size": blk.mlp.fc1.out_features,
        "num_hidden_layers": n,
        "num_attention_heads": blk.attn.num_heads,
        "image_size": size,
        "patch_size": module.patch_embed.patch_size[0],
        "hidden_act": "gelu",
        "layer_norm_eps": blk.norm1.eps,
        "qkv_bias": blk.attn.qkv.bias is not None,
    }


def llava_model(model, llm_config: dict):
    """The transformers LLaVA model holding ``model``'s weights (fp32, on CPU).

    Args:
        model: a MedVLM that :func:`check_exportable` accepts, with a Llama-family decoder.
        llm_config: the run's LLM ``config.json`` as a dict.
    """
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    check_exportable(model)
    enc = next(iter(model.encoders.values()))
    conn = next(iter(model.connectors.values()))
    dec = model.decoder
    if any("lora_" in k or k.endswith("magnitude") for k in dec.state_dict()):
        raise ExportError(
            "the decoder holds LoRA adapters: export a merged checkpoint (merge_adapters: true)"
        )
    state = vision_to_hf(enc)
    proj, act = projector_to_hf(conn)
    state.update(proj)
    state.update(llm_to_hf(dec.state_dict(), head_layout(llm_config)))
    text = {k: v for k, v in llm_config.items() if k not in ("architectures", "torch_dtype")}
    vis = vision_config(enc)
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(**vis),
        text_config=AutoConfig.for_model(**text),
        image_token_index=model.image_token_id,
        vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act=act,
        multimodal_projector_bias=True,
        image_seq_length=enc.num_tokens,
        tie_word_embeddings=bool(llm_config.get("tie_word_embeddings", False)),
    )
    from transformers.initialization import no_init_weights

    # on CPU without random init (the weights are replaced below); not on meta, which would leave
    # the rotary inv_freq buffers (not in the state dict) without data
    with no_init_weights():
        hf = LlavaForConditionalGeneration(config)
    want = set(hf.state_dict())
    if llm_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    missing, extra = want - set(state), set(state) - want
    if missing or extra:  # a bug in the map, not a user error: name it
        raise RuntimeError(f"LLaVA map: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    hf.load_state_dict(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
        strict=True,
        assign=True,
    )
    return hf.eval()


def llava_processor(enc, tokenizer_files: Path, image_token: str = IMAGE_TOKEN):
    """The processor for an exported model: image processor + tokenizer + chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    t = enc.transform
    size = t["image_size"] if isinstance(t["image_size"], int) else t["image_size"][0]
    mode = t.get("resize_mode", "squash")
    if mode == "pad":
        raise ExportError("resize_mode 'pad' has no transformers image processor equivalent")
    resize = {"height": size, "width": size} if mode == "squash" else {"shortest_edge": size}
    images = CLIPImageProcessor(
        size=resize,
        crop_size={"height": size, "width": size},
        do_center_crop=mode == "crop",
        resample=_RESAMPLE[t.get("interpolation", "bicubic")],
        image_mean=list(t["mean"]),
        image_std=list(t["std"]),
        do_convert_rgb=True,
    )
    tok = _hf_tokenizer(tokenizer_files)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|eot_id|>",  # batched generation pads on the left with a stop token
        padding_side="left",
    )
    module, _, _ = _tower(enc)
    patch = module.patch_size[0] if hasattr(module, "conv1") else module.patch_embed.patch_size[0]
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE.replace("@IMAGE@", image_token),
        image_token=image_token,
        num_additional_image_tokens=1,
    )


def _hf_tokenizer(files: Path):
    """A ``tokenizers.Tokenizer`` for a Llama-3 folder: its ``tokenizer.json`` when it holds a
    model, else Meta's tiktoken ``original/tokenizer.model`` converted (specials from
    ``tokenizer.json``'s ``added_tokens``, in id order)."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    files = Path(files)
    tj = files / "tokenizer.json"
    data = json.loads(tj.read_text()) if tj.is_file() else {}
    if data.get("model"):
        return Tokenizer.from_file(str(tj))
    tiktoken_file = files / "original" / "tokenizer.model"
    if not tiktoken_file.is_file():
        raise ExportError(
            f"{files}: no tokenizer.json with a model and no original/tokenizer.model to convert"
        )
    from tokenizers import AddedToken

    added = sorted(data.get("added_tokens", []), key=lambda a: a["id"])
    tok = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=LLAMA3_PATTERN).converted()
    # Llama-3's specials follow the base ranks in id order; adding them in that order gives each
    # its id, checked below so a gap in the list cannot shift them silently
    tok.add_special_tokens(
        [AddedToken(a["content"], special=True, normalized=False) for a in added]
    )
    for a in added:
        if tok.token_to_id(a["content"]) != a["id"]:
            raise ExportError(
                f"{tj}: special token {a['content']} has id {a['id']} but converts to "
                f"{tok.token_to_id(a['content'])}"
            )
    return tok


def model_card(cfg, eval_dir: Path | None) -> str:
    """A short README naming the base LLM, the training data and medtune's eval results."""
    ds = cfg.get("dataset", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [medtune, llava, medical]",
        "---",
        "# Exported from medtune",
        "",
        f"- LLM: `{cfg.get('checkpointer', {}).get('checkpoint_dir', '?')}`",
        f"- training data: `{ds.get('_component_', '?')}` at `{ds.get('root', ds.get('source', '?'))}`"
        f" (split `{ds.get('split', '?')}`)",
        f"- trained parts: {dict(cfg.get('trainable', {}))}",
        "",
    ]
    results = eval_dir / "results.json" if eval_dir else None
    if results and results.is_file():
        lines += ["## medtune eval", "", "```json", results.read_text().strip(), "```", ""]
    lines += [
        "Load with `AutoModelForImageTextToText.from_pretrained(folder)` and "
        "`AutoProcessor.from_pretrained(folder)`; prompts follow the chat template.",
    ]
    return "\n".join(lines) + "\n"


def export_hf(
    ckpt_dir: str | Path, out_dir: str | Path, eval_dir: str | Path | None = None
) -> Path:
    """Write the checkpoint ``ckpt_dir`` (a run's ``epoch_k``) as a transformers LLaVA folder.

    Args:
        ckpt_dir: a medtune checkpoint folder (``config.yaml`` + ``model.safetensors``).
        out_dir: the folder to write.
        eval_dir: an ``eval`` run's output folder whose ``results.json`` goes into the model card.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: the model has no exact LLaVA equivalent (says why).
    """
    from transformers import GenerationConfig

    from medtune.models.llm import family_of_hf_config
    from medtune.training.loading import load_from_checkpoint

    model, tokenizer, cfg = load_from_checkpoint(ckpt_dir, llm_dtype="fp32")
    llm_dir = Path(str(cfg.checkpointer.checkpoint_dir))
    llm_config = json.loads((llm_dir / "config.json").read_text())
    family = family_of_hf_config(llm_config, llm_dir / "config.json")
    if family != "llama3":
        raise ExportError(
            f"LLM family {family}: its vocabulary has no reserved token for the image placeholder "
            "and the exported chat template is Llama-3's; exporting it needs an added <image> token "
            "(resized embeddings) and its own template, which medtune does not write yet"
        )
    hf = llava_model(model, llm_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stops = [int(t) for t in getattr(tokenizer, "stop_tokens", [tokenizer.eos_id])]
    hf.generation_config = GenerationConfig(
        bos_token_id=int(tokenizer.bos_id), eos_token_id=stops, pad_token_id=stops[0]
    )
    hf.save_pretrained(out)
    llava_processor(next(iter(model.encoders.values())), llm_dir).save_pretrained(out)
    (out / "README.md").write_text(model_card(cfg, Path(eval_dir) if eval_dir else None))
    return out
