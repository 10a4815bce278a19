"""Where BLIP's ITM looks: Grad-CAM on the cross-attention of one text-encoder layer, as BLIP /
ALBEF's visualization (and the brain-VLP seed's ``vis.py``) computes it; used by
``tools/attention_map.py`` (BLIP mode).

The ITM "match" logit is back-propagated to the attention probabilities of the chosen layer's
cross-attention ``[heads, T, 1 + patches]``; ``cam = attention * clamp(gradient, 0)`` over the
patch columns ([CLS] dropped), padding tokens zeroed, mean over heads. Only ``[ENC]`` feeds the
ITM head, so the words' rows of the last layer get no gradient: a larger ``layer`` is clamped to
the second-to-last (BLIP's demos read layer 8 of 12).
"""

from __future__ import annotations

from pathlib import Path

import torch


def itm_grad_cam(
    model, tokenizer, image: torch.Tensor, text: str, layer: int = 8, max_length: int = 35
) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """Grad-CAM of BLIP's ITM match logit on one cross-attention layer.

    Args:
        model: a :class:`medtune.models.blip.Blip` (eval mode).
        tokenizer: its tokenizer (``medtune.models.blip.blip_tokenizer``).
        image: ``[1, 3, H, W]``, transformed as the model's encoder expects.
        text: the caption.
        layer: the text-encoder layer read (clamped to the second-to-last).
        max_length: caption tokens kept.

    Returns:
        ``(cam [gh, gw] averaged over the words, word pieces, one cam [gh, gw] per word piece)``
        on the ViT's patch grid (not normalised).
    """
    layers = model.text_encoder.encoder.layer
    attn = layers[min(layer, max(len(layers) - 2, 0))].crossattention.self
    tok = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    saved = {}

    def hook(_m, _inputs, output):
        output[1].retain_grad()  # [1, heads, T, 1 + patches]: the probabilities BLIP saves
        saved["a"] = output[1]

    h = attn.register_forward_hook(hook)
    try:
        model.zero_grad()
        with torch.enable_grad():
            logit = model.itm_logits(model.image_tokens(image), tok.input_ids, tok.attention_mask)
            logit[:, 1].sum().backward()
    finally:
        h.remove()
    a, g = saved["a"].detach()[0], saved["a"].grad[0]  # [heads, T, 1 + n]
    grid = model.visual_encoder.patch_embed.grid_size
    mask = tok.attention_mask[0].float()[None, :, None]
    cam = (a[..., 1:] * g[..., 1:].clamp(min=0) * mask).mean(0).reshape(-1, *grid)  # [T, gh, gw]
    n = int(tok.attention_mask[0].sum())
    words = tokenizer.convert_ids_to_tokens(tok.input_ids[0, 1 : n - 1].tolist())
    whole = cam[1 : n - 1].mean(0) if n > 2 else cam.mean(0)
    return whole, words, [cam[k + 1] for k in range(len(words))]


def load_blip_checkpoint_folder(ckpt: Path, overrides: dict[str, str]):
    """(model in eval mode, tokenizer, max_length) of a ``blip_*`` checkpoint folder
    (``config.yaml`` + ``model.safetensors``); the decoder is built when the checkpoint has one."""
    from omegaconf import OmegaConf
    from safetensors import safe_open
    from torchtune import config

    from medtune.training.blip_state import load_blip_state

    cfg = OmegaConf.load(Path(ckpt) / "config.yaml")
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    with safe_open(str(Path(ckpt) / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    decoder = any(k.startswith("text_decoder.") for k in names)
    encoder = config.instantiate(cfg.encoder)
    model = config.instantiate(cfg.model, vision=encoder, decoder=decoder)
    load_blip_state(model, ckpt)
    return model.eval(), config.instantiate(cfg.tokenizer), int(cfg.get("max_length", 35))


def is_blip_checkpoint(ckpt: Path | None) -> bool:
    """Whether a folder's ``config.yaml`` builds a ``medtune.models.blip`` model."""
    if ckpt is None or not (Path(ckpt) / "config.yaml").is_file():
        return False
    from omegaconf import OmegaConf

    comp = OmegaConf.load(Path(ckpt) / "config.yaml").get("model", {}).get("_component_", "")
    return str(comp).startswith("medtune.models.blip")
