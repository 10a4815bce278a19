"""transformers LLaVA <-> MedVLM: exact export (logits, processor) and import (round trip, logits).

The tiny MedVLM of the generated assets (open_clip ViT, mlp / linear connector, tiny Llama-3) with
``feature_layer`` set is written as a ``LlavaForConditionalGeneration``; transformers' logits on it
must equal medtune's within 1e-4 in fp32, and the processor must produce medtune's prompt ids and
pixels. A tiny random transformers LLaVA (CLIP tower, Llama LLM) built from config imports into a
MedVLM whose logits equal transformers'.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _medtune_inputs(model, tokenizer, image, question):
    from medtune.data.model_transform import medvlm_transform
    from medtune.data.sample import Message, Sample

    transform = medvlm_transform(model, tokenizer, max_seq_len=256)
    sample = Sample(id="q0", images=[image], messages=[Message("user", question)])
    item = transform(sample, inference=True)
    return item


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    from medtune.models.builders import tiny_medvlm
    from medtune.models.llama3 import llama3_tokenizer

    torch.manual_seed(0)
    model = tiny_medvlm(str(tiny_assets), feature_layer=-1).eval()
    for p in model.connectors.parameters():  # the assets' connector is untrained: give it weight
        torch.nn.init.normal_(p, std=0.2)
    llm = tiny_assets / "llama3_tiny"
    tok = llama3_tokenizer(
        str(llm / "original" / "tokenizer.model"), special_tokens_path=str(llm / "tokenizer.json")
    )
    return model, tok, llm


@pytest.mark.parametrize("connector", ["mlp", "linear"])
def test_export_logits_equal(tiny, tiny_assets, connector):
    from medtune.models.builders import tiny_medvlm
    from medtune.training.export_llava import llava_model

    model, _, llm = tiny
    if connector == "linear":
        torch.manual_seed(1)
        model = tiny_medvlm(str(tiny_assets), connector="linear", feature_layer=-2).eval()
    hf = llava_model(model, json.loads((llm / "config.json").read_text()))
    g = torch.Generator().manual_seed(0)
    n = model.tokens_per_image
    ids = torch.randint(0, 1000, (2, 7 + n), generator=g)
    ids[:, 2 : 2 + n] = model.image_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ours = model(ids, images=pixels)
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_processor_reproduces_prompt_and_pixels(tiny, tiny_assets, tmp_path):
    from PIL import Image

    from medtune.training.export_llava import llava_processor

    model, tok, llm = tiny
    enc = next(iter(model.encoders.values()))
    proc = llava_processor(enc, llm)
    proc.save_pretrained(tmp_path)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tmp_path)
    img_path = sorted((tiny_assets / "tiny_slake" / "Slake1.0" / "imgs").glob("*/source.png"))[0]
    question = "  Which side is the lesion on? "
    item = _medtune_inputs(model, tok, str(img_path), question)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    batch = proc(images=[Image.open(img_path)], text=[text], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == item["tokens"]
    ours = item["images"]["image"][0] if isinstance(item["images"], dict) else item["images"][0]
    # the same PIL resize and normalization: equal to float rounding
    torch.testing.assert_close(batch["pixel_values"][0], ours, atol=1e-6, rtol=0)


def _load_llm(model, folder):
    from medtune.models.llava import LlavaLLMCheckpointer

    state = LlavaLLMCheckpointer(str(folder)).load_checkpoint()["model"]
    model.decoder.load_state_dict(state, strict=True)
    return model.eval()


def test_round_trip_is_bitwise(tiny, tmp_path):
    """medtune -> transformers LLaVA folder -> medtune gives the same tensors, every one that a
    LLaVA model carries (open_clip's pooled ``proj`` is not one of them)."""
    from medtune.models.llava import llava_medvlm
    from medtune.training.export_llava import llava_model

    model, _, llm = tiny
    llava_model(model, json.loads((llm / "config.json").read_text())).save_pretrained(tmp_path)
    back = _load_llm(llava_medvlm(str(tmp_path)), tmp_path)
    ours, theirs = model.state_dict(), back.state_dict()
    carried = [k for k in ours if k != "encoders.image.tower.proj"]
    assert set(carried) == set(theirs) - {"encoders.image.tower.proj"}
    for k in carried:
        assert torch.equal(ours[k], theirs[k]), k
    assert back.image_token_id == model.image_token_id
    assert back.encoders["image"].feature_layer == -1


@pytest.mark.parametrize("tower,llm", [("clip", "llama"), ("vit", "llama"), ("clip", "mistral")])
def test_import_random_llava_logits_equal(tower, llm, tmp_path):
    """A tiny random transformers LLaVA built from config imports with equal logits."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        ViTConfig,
    )

    from medtune.models.llava import llava_medvlm

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    vc = (
        CLIPVisionConfig(**vision, hidden_act="quick_gelu")
        if tower == "clip"
        else ViTConfig(**vision)
    )
    shape = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, rope_theta=10000.0, max_position_embeddings=128,
    )  # fmt: skip
    if llm == "llama":
        tc = LlamaConfig(**shape)
    else:  # LLaVA-Med v1.5's LLM family
        from transformers import MistralConfig

        tc = MistralConfig(**shape, sliding_window=None)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vc, text_config=tc, image_token_index=299, vision_feature_layer=-2
        )
    ).eval()
    hf.save_pretrained(tmp_path)
    model = _load_llm(llava_medvlm(str(tmp_path)), tmp_path)
    n = model.tokens_per_image
    assert n == 16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 290, (2, 6 + n), generator=g)
    ours_ids, hf_ids = ids.clone(), ids.clone()
    ours_ids[:, 1 : 1 + n] = model.image_token_id
    hf_ids[:, 1 : 1 + n] = 299
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
        ours = model(ours_ids, images=pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# LLaVA-Med v1.5's transformers conversion: CLIP ViT-L/14-336 (penultimate block), Mistral-7B-v0.2.
LLAVA_MED = {
    "model_type": "llava",
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "hidden_act": "quick_gelu", "projection_dim": 768,
    },
    "text_config": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
    },
}  # fmt: skip


def test_llava_med_full_size_on_meta(tmp_path):
    """The full-size import builds on meta with transformers' own parameter counts: tower
    303,507,456 (CLIPVisionModel ViT-L/14-336 without its pooled projection), projector
    21,000,192, Mistral-7B 7,241,732,096."""
    from transformers import AutoConfig, AutoModel, MistralForCausalLM

    from medtune.models.llava import llava_medvlm

    (tmp_path / "config.json").write_text(json.dumps(LLAVA_MED))
    with torch.device("meta"):
        model = llava_medvlm(str(tmp_path), load_weights=False, max_seq_len=2048)
        hf_vision = AutoModel.from_config(AutoConfig.for_model(**LLAVA_MED["vision_config"]))
        hf_llm = MistralForCausalLM(AutoConfig.for_model(**LLAVA_MED["text_config"]))

    def count(m, skip=()):
        return sum(p.numel() for n, p in m.named_parameters() if n not in skip)

    tower = count(model.encoders["image"].tower, skip={"proj"})
    assert tower == count(hf_vision) == 303_507_456
    assert count(model.connectors["image"]) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert count(model.decoder) == count(hf_llm) == 7_241_732_096
    assert model.tokens_per_image == 576 and model.encoders["image"].feature_layer == -2
    assert model.encoders["image"].transform["resize_mode"] == "crop"


def test_init_from_kind_hf_llava(tiny, tmp_path):
    """``init_from: {kind: hf_llava, path}`` gives a model built without weights exactly the
    tower and projector tensors of the folder; a bad folder is named."""
    from medtune.models.convert import KeyMapError
    from medtune.models.convert.init import foreign_state_dict
    from medtune.models.llava import llava_medvlm
    from medtune.training.export_llava import llava_model

    model, _, llm = tiny
    llava_model(model, json.loads((llm / "config.json").read_text())).save_pretrained(tmp_path)
    empty = llava_medvlm(str(tmp_path), load_weights=False)
    state = foreign_state_dict(empty, {"kind": "hf_llava", "path": str(tmp_path)})
    assert set(state) == {
        k
        for k in model.state_dict()
        if k.startswith(("encoders.", "connectors.")) and not k.endswith(".proj")
    }
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]), k
    # a folder whose projector lost a tensor is refused with the key named
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("multi_modal_projector.linear_2.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyMapError, match="linear_2.weight"):
        foreign_state_dict(empty, {"kind": "hf_llava", "path": str(tmp_path)})
