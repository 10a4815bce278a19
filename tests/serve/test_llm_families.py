"""``medtune serve`` with a Qwen2.5 MedVLM (ChatML, placeholder -200): the answer equals the
inference path's, and the reply holds no ChatML special token."""

from __future__ import annotations

import torch
from openai import OpenAI

from medtune.data.sample import IMAGE_MARKER, Message, Sample
from medtune.generation import GenerationConfig
from medtune.inference import answer
from medtune.serve import Engine, create_app
from medtune.serve.images import decode_image
from medtune.testing.llm_families import cached_tiny_llms

from .conftest import image_message, running


def test_serve_qwen_family(tiny_assets, scans):
    from medtune.models.llm.builders import medvlm_open_clip_llm
    from medtune.models.llm.qwen2_5 import qwen2_5_tokenizer

    q = cached_tiny_llms() / "qwen2_5_tiny"
    tok = qwen2_5_tokenizer(str(q / "vocab.json"), str(q / "merges.txt"), str(q / "tokenizer.json"))
    torch.manual_seed(0)
    vlm = medvlm_open_clip_llm(str(q / "config.json"), str(tiny_assets / "tiny_clip")).eval()
    engine = Engine(vlm, tok, name="tiny-qwen")
    with running(create_app(engine, max_batch_size=4, max_wait_ms=10)) as url:
        c = OpenAI(base_url=url + "/v1", api_key="unused")
        r = c.chat.completions.create(
            model="tiny-qwen",
            messages=image_message(scans[0], "Which side?"),
            max_tokens=5,
            temperature=0,
        )
    sample = Sample("x", [], [Message("user", IMAGE_MARKER + "Which side?")])
    sample.images.append(decode_image(scans[0], "p", max_pixels=1 << 24))
    want = answer(
        vlm, engine.transform, [sample], GenerationConfig(max_new_tokens=5), tokenizer=tok
    )[0]
    text = r.choices[0].message.content
    assert text == engine.decode(want.token_ids)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    assert r.usage.prompt_tokens == want.prompt_tokens
