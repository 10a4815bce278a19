"""Image towers (open_clip hub folders, timm) and connectors: shapes, token counts, weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.models.builders import CONNECTORS, build_connector
from medtune.models.encoders import open_clip_vision, timm_vision


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- open_clip (native ViT)
def test_tiny_open_clip_matches_open_clip_factory(tiny_assets):
    import open_clip

    clip_dir = tiny_assets / "tiny_clip"
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())
    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    ref.eval()
    patch = open_clip_vision(str(clip_dir), output="patch").eval()
    pooled = open_clip_vision(f"local-dir:{clip_dir}", output="pooled").eval()

    ref_sd = ref.visual.state_dict()
    ours = patch.tower.state_dict()
    assert sorted(ours) == sorted(ref_sd)
    for k, v in ref_sd.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0)

    vc = cfg["model_cfg"]["vision_cfg"]
    size, grid = vc["image_size"], vc["image_size"] // vc["patch_size"]
    x = _images(2, size)
    with torch.no_grad():
        ref.visual.output_tokens = True
        ref_pooled, ref_tokens = ref.visual(x)
        p, t = pooled(x), patch(x)
    assert (
        t.shape == (2, grid * grid, vc["width"])
        and patch.num_tokens == grid * grid
        and patch.out_dim == vc["width"]
    )
    assert p.shape == (2, 1, cfg["model_cfg"]["embed_dim"]) and pooled.num_tokens == 1
    torch.testing.assert_close(t, ref_tokens)
    torch.testing.assert_close(p[:, 0], ref_pooled)
    # the named transform is the folder's preprocess config
    assert patch.transform["image_size"] == size
    assert patch.transform["mean"] == pytest.approx(list(preprocess.transforms[-1].mean))
    assert patch.transform["std"] == pytest.approx(list(preprocess.transforms[-1].std))


def test_open_clip_folder_errors(tiny_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip model folder not found"):
        open_clip_vision(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        open_clip_vision(str(tmp_path / "empty"))
    # weights of another architecture: clear mismatch error
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_assets / "tiny_clip" / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] += 1
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    (bad / "open_clip_pytorch_model.bin").write_bytes(
        (tiny_assets / "tiny_clip" / "open_clip_pytorch_model.bin").read_bytes()
    )
    with pytest.raises(ValueError, match="do not match open_clip_config.json"):
        open_clip_vision(str(bad))


# ----------------------------------------------------------------------------- open_clip (timm trunk)
def _write_timm_open_clip_dir(path: Path, embed_dim: int = 32) -> dict[str, torch.Tensor]:
    from open_clip.model import _build_vision_tower

    vision_cfg = {
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    }
    cfg = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": vision_cfg,
            "text_cfg": {
                "context_length": 8,
                "vocab_size": 16,
                "width": 16,
                "heads": 2,
                "layers": 1,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    torch.manual_seed(1)
    visual = _build_vision_tower(embed_dim, dict(vision_cfg))
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    sd["text.dummy"] = torch.zeros(1)  # the text tower's weights are never needed
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "open_clip_pytorch_model.bin")
    return {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}


def test_timm_backed_open_clip_dir(tmp_path):
    saved = _write_timm_open_clip_dir(tmp_path / "timm_clip", embed_dim=32)
    patch = open_clip_vision(str(tmp_path / "timm_clip"), output="patch").eval()
    pooled = open_clip_vision(str(tmp_path / "timm_clip"), output="pooled").eval()
    for k, v in patch.tower.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    x = _images(2, 224)
    with torch.no_grad():
        t, p = patch(x), pooled(x)
        ref_pooled = patch.tower(x)  # open_clip's TimmModel forward: CLS -> linear projection
    assert t.shape == (2, 196, 192) and patch.num_tokens == 196 and patch.out_dim == 192
    assert p.shape == (2, 1, 32) and pooled.num_tokens == 1 and pooled.out_dim == 32
    torch.testing.assert_close(p[:, 0], ref_pooled)
    # patch tokens are the trunk's final (normed) tokens without the CLS token
    with torch.no_grad():
        feats = patch.tower.trunk.forward_features(x)
    torch.testing.assert_close(t, feats[:, 1:])
    assert patch.transform == {"image_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3}


# ----------------------------------------------------------------------------- timm
def test_timm_vit_encoder_and_checkpoint(tmp_path):
    kw = dict(image_size=32, depth=2, embed_dim=48, num_heads=3)
    enc = timm_vision("vit_tiny_patch16_224", output="patch", **kw).eval()
    assert enc.num_tokens == 4 and enc.out_dim == 48
    x = _images(3, 32)
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (3, 4, 48)
    # weights round-trip through a file (safetensors and torch), other weights are rejected
    from safetensors.torch import save_file

    save_file(enc.tower.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(enc.tower.state_dict(), tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        again = timm_vision(
            "vit_tiny_patch16_224", checkpoint_path=str(tmp_path / f), output="patch", **kw
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(x), out)
    pooled = timm_vision(
        "vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "w.pt"), output="pooled", **kw
    ).eval()
    with torch.no_grad():
        p = pooled(x)
    assert p.shape == (3, 1, 48) and pooled.num_tokens == 1
    with pytest.raises(ValueError, match="weights do not match timm"):
        timm_vision(
            "vit_tiny_patch16_224",
            checkpoint_path=str(tmp_path / "w.pt"),
            image_size=32,
            depth=3,
            embed_dim=48,
            num_heads=3,
        )


def test_timm_sam_style_encoder():
    enc = timm_vision(
        "samvit_base_patch16",
        output="patch",
        image_size=64,
        depth=2,
        embed_dim=32,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=2,
        neck_chans=24,
    ).eval()
    x = _images(2, 64)
    with torch.no_grad():
        out = enc(x)
    # SAM's neck gives a [b, C, H, W] map: 4x4 grid of neck_chs-wide tokens
    assert enc.num_tokens == 16
    assert out.shape == (2, 16, enc.out_dim)
    assert enc.out_dim == 24


# ----------------------------------------------------------------------------- connectors
@pytest.mark.parametrize(
    "kind,kwargs,n_out",
    [
        ("linear", {}, 5),
        ("mlp", {}, 5),
        ("mlp", {"hidden_dim": 7}, 5),
        ("pooled_unfold", {"num_tokens": 3}, 3),
        ("learned_queries", {"num_queries": 4, "hidden_dim": 16, "num_heads": 2}, 4),
        ("resampler", {"num_latents": 6, "hidden_dim": 16, "num_heads": 2}, 6),
    ],
)
def test_connector_shapes(kind, kwargs, n_out):
    conn = build_connector(kind, 12, 20, **kwargs)
    x = torch.randn(2, 5, 12)
    y = conn(x)
    assert y.shape == (2, n_out, 20)
    assert conn.num_tokens(5) == n_out
    assert (conn.in_dim, conn.out_dim) == (12, 20)
    # samples do not mix: changing sample 1 leaves sample 0's output unchanged
    x2 = x.clone()
    x2[1] += 1.0
    torch.testing.assert_close(conn(x2)[0], y[0])
    assert not torch.allclose(conn(x2)[1], y[1])


def test_connector_parameter_counts():
    assert (
        sum(p.numel() for p in build_connector("mlp", 12, 20).parameters())
        == 12 * 20 + 20 + 20 * 20 + 20
    )
    assert (
        sum(p.numel() for p in build_connector("pooled_unfold", 12, 20, num_tokens=3).parameters())
        == 12 * 60 + 60
    )
    with pytest.raises(ValueError, match="unknown connector 'conv'"):
        build_connector("conv", 1, 1)
    assert set(CONNECTORS) == {
        "linear",
        "mlp",
        "pooled_unfold",
        "learned_queries",
        "resampler",
        "blip2_qformer",
    }


def test_towers_build_in_fp32_under_a_bf16_default(tiny_assets):
    """Recipes build the whole model under the frozen LLM's dtype; towers must still load the
    pretrained fp32 weights exactly (fp32 master weights for trained encoders)."""
    ref = open_clip_vision(str(tiny_assets / "tiny_clip")).tower.state_dict()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        enc = open_clip_vision(str(tiny_assets / "tiny_clip"))
        vit = timm_vision("vit_tiny_patch16_224", image_size=32, depth=1, embed_dim=48, num_heads=3)
    finally:
        torch.set_default_dtype(old)
    assert (
        {p.dtype for p in enc.parameters()}
        == {p.dtype for p in vit.parameters()}
        == {torch.float32}
    )
    for k, v in enc.tower.state_dict().items():
        assert torch.equal(v, ref[k]), k
