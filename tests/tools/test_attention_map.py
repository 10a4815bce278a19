"""tools/attention_map.py: the PNG exists, has the image's size, and the map changes with the text.

Two modes: Grad-CAM of a dual encoder (tiny towers) and a MedVLM's answer attention over the image
tokens (a tiny vision_finetune checkpoint trained for 1 step through the CLI, in this process).
The tool's ``main`` runs in-process under :func:`medtune.utils.errors.run_entry`, as its
``__main__`` does.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtune._cli.main import main as medtune_main
from medtune.utils.errors import UserError, run_entry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def am():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import attention_map
    finally:
        sys.path.pop(0)
    return attention_map


def _tool(am, capsys, *argv: str) -> tuple[int, str, str]:
    """``python tools/attention_map.py <argv>`` in this process: (status, stdout, stderr)."""
    status = run_entry("attention_map", lambda: am.main(list(argv)))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A non-square image (80 x 56), so that a transposed map would show."""
    from medtune.testing.datasets import make_medical_image

    path = tmp_path_factory.mktemp("img") / "scan.png"
    make_medical_image(1, modality="CT", lesion="left").convert("RGB").resize((80, 56)).save(path)
    return path


@pytest.fixture(scope="module")
def medvlm_ckpt(tiny_assets, tmp_path_factory) -> Path:
    """A tiny vision_finetune checkpoint: 1 step through ``medtune run``, in this process."""
    out = tmp_path_factory.mktemp("vf")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        medtune_main(["run", "vision_finetune", "--config", "demo", f"assets_dir={tiny_assets}",
                      f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1", "batch_size=4",
                      "val_dataset=null", "log_every_n_steps=100"])  # fmt: skip
    assert not e.value.code, buf.getvalue()[-2000:]
    return out / "epoch_0"


@pytest.fixture(scope="module")
def medvlm(medvlm_ckpt):
    from medtune.training.loading import load_from_checkpoint

    model, tokenizer, _ = load_from_checkpoint(medvlm_ckpt)
    return model, tokenizer


def test_grad_cam_png_and_text_dependence(am, tiny_towers, scan, tmp_path, capsys):
    from medtune.models.dual_encoder import open_clip_dual_encoder, tokenizer_for

    model = open_clip_dual_encoder(
        str(tiny_towers / "tiny_biomedclip"), str(tiny_towers / "tiny_bert")
    ).eval()
    image = Image.open(scan).convert("RGB")
    a = am.grad_cam(model, tokenizer_for(model), image, "lesion in the upper left region.")
    b = am.grad_cam(model, tokenizer_for(model), image, "normal, no lesion.")
    assert a.shape == b.shape == (56, 80)
    assert a.min() >= 0 and a.max() <= 1 and a.max() > 0
    assert not np.array_equal(a, b)  # the map depends on the text

    out = tmp_path / "cam.png"
    status, stdout, err = _tool(am, capsys, "--model-dir", str(tiny_towers / "tiny_biomedclip"),
                                "--text-model-dir", str(tiny_towers / "tiny_bert"), "--image", str(scan),
                                "--text", "lesion", "--out", str(out))  # fmt: skip
    assert status == 0, err[-2000:]
    assert Image.open(out).size == (80, 56) and "wrote" in stdout
    status, _, err = _tool(am, capsys, "--model-dir", str(tmp_path), "--image", str(scan),
                           "--text", "x", "--out", str(out))  # fmt: skip
    assert (
        status == 1 and err.startswith("attention_map: error:") and "open_clip_config.json" in err
    )
    assert len(err.strip().splitlines()) == 1


def test_recomputed_probabilities_reproduce_each_layer(am, medvlm, scan):
    """softmax(qk^T/sqrt(d)) from the hooked q/k (RoPE, GQA repeat), times the layer's v, equals
    what enters the layer's output projection: the recomputation is the layer's own attention."""
    model, tokenizer = medvlm
    from medtune.data.model_transform import medvlm_transform
    from medtune.data.sample import Message, Sample

    attn0 = model.decoder.layers[0].attn
    assert attn0.num_heads != attn0.num_kv_heads  # the tiny Llama-3 uses GQA: the repeat is tested
    item = medvlm_transform(model, tokenizer)(
        Sample("s", [str(scan)], [Message("user", "Where is the lesion?")], {}), inference=True
    )
    tokens = torch.tensor([item["tokens"]])
    got: dict = {}
    hooks = []
    for i, layer in enumerate(model.decoder.layers):
        for part in ("q_proj", "k_proj", "v_proj"):
            hooks.append(getattr(layer.attn, part).register_forward_hook(
                lambda _m, _a, out, key=(i, part): got.__setitem__(key, out)))  # fmt: skip
        hooks.append(layer.attn.output_proj.register_forward_pre_hook(
            lambda _m, args, key=(i, "ctx"): got.__setitem__(key, args[0])))  # fmt: skip
    try:
        with torch.no_grad():
            model(tokens, images=item["images"], image_counts=torch.tensor([1]))
    finally:
        for h in hooks:
            h.remove()
    s = tokens.shape[1]
    rows = torch.arange(s)
    for i, layer in enumerate(model.decoder.layers):
        a = layer.attn
        p = am.attention_probs(a, got[i, "q_proj"], got[i, "k_proj"], rows)  # [1, h, s, s]
        assert p.shape == (1, a.num_heads, s, s)
        torch.testing.assert_close(p.sum(-1), torch.ones(1, a.num_heads, s))
        assert p.triu(1).eq(0).all()  # causal
        v = got[i, "v_proj"].view(1, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = v.repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)
        ctx = (p @ v).transpose(1, 2).reshape(1, s, -1)
        torch.testing.assert_close(ctx, got[i, "ctx"], msg=f"layer {i}")


def test_medvlm_map_png_and_question_dependence(am, medvlm, medvlm_ckpt, scan, tmp_path, capsys):
    model, tokenizer = medvlm
    a, ans_a = am.medvlm_attention(model, tokenizer, scan, "Which side is the lesion on?",
                                   max_new_tokens=4)  # fmt: skip
    b, _ = am.medvlm_attention(model, tokenizer, scan, "What modality is this image?",
                               max_new_tokens=4)  # fmt: skip
    assert a.shape == b.shape == (56, 80) and a.dtype == np.float32
    assert a.min() == 0 and a.max() == pytest.approx(1.0)
    assert not np.allclose(a, b, atol=1e-3)  # the map depends on the question
    last, _ = am.medvlm_attention(model, tokenizer, scan, "Which side is the lesion on?",
                                  max_new_tokens=4, layers=1)  # fmt: skip
    assert not np.allclose(a, last, atol=1e-3)  # --layers 1 reads the last layer only

    out = tmp_path / "attn.png"
    status, stdout, err = _tool(am, capsys, "--checkpoint", str(medvlm_ckpt), "--image", str(scan),
                                "--question", "Which side is the lesion on?", "--max-new-tokens", "4",
                                "--out", str(out))  # fmt: skip
    assert status == 0, err[-2000:]
    assert Image.open(out).size == (80, 56)
    assert f"answer: {ans_a}\n" in stdout  # the one inference path's answer, greedy
    png = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    base = np.asarray(Image.open(scan).convert("RGB"), dtype=np.float32)
    expect = np.asarray(am.overlay(Image.open(scan), a), dtype=np.float32)
    assert np.array_equal(png, expect) and not np.array_equal(png, base)

    status, _, err = _tool(am, capsys, "--checkpoint", str(medvlm_ckpt), "--image", str(scan),
                           "--question", "x", "--encoder", "nope", "--out", str(out))  # fmt: skip
    assert status == 1 and err.startswith("attention_map: error: --encoder 'nope'")
    assert len(err.strip().splitlines()) == 1


def test_connector_without_patch_tokens_is_a_user_error(am, tiny_assets):
    from medtune.models.builders import tiny_medvlm

    model = tiny_medvlm(
        str(tiny_assets), connector="pooled_unfold", connector_kwargs={"num_tokens": 4}
    )
    with pytest.raises(UserError, match="does not keep one LLM token per image patch"):
        am._patch_grid(model, None)
    grid = am._patch_grid(tiny_medvlm(str(tiny_assets)), None)
    assert grid == ("image", 0, (4, 4))
