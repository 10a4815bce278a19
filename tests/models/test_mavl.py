"""MAVL model: the released-checkpoint key map on a state dict with MAVL's own names and shapes,
the full-size model on ``meta`` (parameter counts by hand), and the losses against MAVL's formulas
(``Pretrain/models/model_MAVL.py`` / ``loss.py``) written out literally."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medtune.models.convert import KeyMapError
from medtune.models.convert.mavl import convert_mavl_state, load_released_mavl
from medtune.models.mavl import MAVLLoss, build_mavl

D, T, K, HEADS = 16, 8, 3, 2
ENTS = [f"e{i}" for i in range(5)]


class _RefAttnPool(nn.Module):  # MAVL's AttentionPool2d attribute names
    def __init__(self, s, c, out):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(s * s + 1, c))
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.c_proj = nn.Linear(c, out)


class _RefLayer(nn.Module):  # transformer.py TransformerDecoderLayer (self_attention=True)
    def __init__(self):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(D, HEADS)
        self.linear1, self.linear2 = nn.Linear(D, 32), nn.Linear(32, D)
        self.norm1, self.self_attn = nn.LayerNorm(D), nn.MultiheadAttention(D, HEADS)
        self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D)


class _RefMAVL(nn.Module):
    """MAVL.__init__'s modules (resnet18 trunk: ``nn.Sequential(*list(resnet.children())[:-3])``)."""

    def __init__(self):
        super().__init__()
        self.disease_embedding_layer = nn.Linear(T, D)
        self.backbone = nn.Sequential(*list(torchvision.models.resnet18().children())[:-3])
        self.pool = _RefAttnPool(4, 256, D)
        self.res_l1 = nn.Sequential(nn.Conv2d(256, 256, 1), nn.PReLU())
        self.res_l2 = nn.Conv2d(256, D, 1)
        self.location_emb = nn.Conv1d(D, T, kernel_size=K, stride=K)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([_RefLayer(), _RefLayer()])
        self.decoder.norm = nn.LayerNorm(D)
        self.classifier = nn.Linear(D * K, 2)
        self.temp = nn.Parameter(torch.randn(K))


def _ours():
    return build_mavl(entities=ENTS, n_concepts=K, text_width=T, block="basic", blocks=[2, 2, 2],
                      width=64, image_size=64, pool_heads=2, d_model=D, heads=HEADS, num_layers=2,
                      dim_feedforward=32)  # fmt: skip


def test_released_checkpoint_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    ref = _RefMAVL()
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    path = tmp_path / "checkpoint_full_46.pth"
    torch.save({"model": sd, "epoch": 46}, path)
    model = _ours()
    load_released_mavl(model, path)
    ours = model.state_dict()
    pairs = {"backbone.4.1.conv2.weight": "image.trunk.layer1.1.conv2.weight",
             "backbone.6.0.downsample.1.running_var": "image.trunk.layer3.0.downsample.1.running_var",
             "backbone.1.num_batches_tracked": "image.trunk.bn1.num_batches_tracked",
             "pool.positional_embedding": "image.pool.positional_embedding",
             "res_l1.1.weight": "image.proj1.1.weight", "disease_embedding_layer.bias": "query_proj.bias",
             "decoder.layers.1.self_attn.in_proj_weight": "decoder.layers.1.self_attn.in_proj_weight",
             "classifier.weight": "classifier.weight", "temp": "temp"}  # fmt: skip
    for theirs, mine in pairs.items():
        assert torch.equal(ours[mine], sd[f"module.{theirs}"]), mine
    assert len(ours) == len(sd)
    for k in ours:  # every tensor came from the file (none kept from initialisation)
        assert any(torch.equal(ours[k], v) and v.shape == ours[k].shape for v in sd.values()), k


def test_key_map_refuses_leftover_missing_and_shape():
    ref = _RefMAVL().state_dict()
    model = _ours()
    with pytest.raises(KeyMapError, match="global_l.weight"):
        convert_mavl_state({**ref, "global_l.weight": torch.zeros(1)}, model)
    with pytest.raises(KeyMapError, match="missing keys for classifier.bias"):
        convert_mavl_state({k: v for k, v in ref.items() if k != "classifier.bias"}, model)
    bad = dict(ref, **{"classifier.weight": torch.zeros(2, D * (K + 1))})
    with pytest.raises(KeyMapError, match=r"classifier.weight has shape \(2, 64\)"):
        convert_mavl_state(bad, model)
    # MAVL's zero-shot scripts drop temp: loading without it is allowed
    no_temp = convert_mavl_state({k: v for k, v in ref.items() if k != "temp"}, model)
    assert "temp" not in no_temp


def test_full_size_on_meta_has_mavl_parameter_counts():
    with torch.device("meta"):
        model = build_mavl()  # MAVL_resnet.yaml: ResNet-50, d_model 256, N 4, H 4, 75 x 9
        r50 = torchvision.models.resnet50()
    trunk = sum(p.numel() for n, p in r50.named_parameters() if not n.startswith(("layer4", "fc")))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model.image.trunk) == trunk == 8_543_296
    assert n(model.image.pool) == 197 * 1024 + 3 * (1024 * 1024 + 1024) + 1024 * 256 + 256
    assert n(model.image.proj1) + n(model.image.proj2) == 1024 * 1024 + 1024 + 1 + 1024 * 256 + 256
    attn = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256
    layer = 2 * attn + (256 * 1024 + 1024) + (1024 * 256 + 256) + 3 * 512
    assert n(model.decoder) == 4 * layer + 512
    assert n(model.query_proj) == 768 * 256 + 256
    assert n(model.location_emb) == 256 * 768 * 9 + 768
    assert n(model.classifier) == 256 * 9 * 2 + 2 and model.temp.numel() == 9
    assert model.concept_book.shape == (75 * 9, 768) and model.anatomy_book.shape == (52, 768)


def _reference_losses(model, out, labels, index, cl_global):
    """MAVL.forward(is_train=True) and SoftTargetCrossEntropy, as written there."""
    b, e = labels.shape

    def sce(x, target):
        return (-target * F.log_softmax(x, dim=-1)).mean(dim=-1).sum() / x.shape[0]

    logits = out["global_logits"]
    contrast = labels.clone().float()
    contrast[(contrast == -1) | (contrast == 2)] = 0
    i2t = torch.stack(
        [sce(logits[:, k::K] * model.temp[i].exp(), contrast) for i, k in enumerate(range(K))]
    ).mean()
    t2i = torch.stack(
        [sce(logits[:, k::K].T * model.temp[i].exp(), contrast.T) for i, k in enumerate(range(K))]
    ).mean()
    ll = torch.bmm(
        model.anatomy_book[index].reshape(b * e, 8, T), out["location"].reshape(b * e, -1, 1)
    ).squeeze()
    lab = labels.reshape(-1, 1)
    mask = ((lab != -1) & (lab != 2)).squeeze()
    ce = F.cross_entropy(out["logits"].reshape(-1, 2)[mask], lab[mask].long()[:, 0])
    pos = (lab == 1).squeeze()
    cl = F.cross_entropy(ll[pos], torch.zeros(b * e, dtype=torch.long)[pos])
    return ce, cl, cl_global * (i2t + t2i)


def test_losses_equal_mavl_formulas():
    torch.manual_seed(0)
    model = _ours()
    model.set_books(torch.randn(52, T), torch.randn(len(ENTS) * K, T))
    out = model(torch.randn(4, 3, 64, 64))
    labels = torch.tensor([[1, 0, -1, 2, 1], [0, 0, 1, -1, 2], [2, 1, 0, 0, -1], [-1, -1, 1, 0, 0]])
    index = torch.randint(0, 52, (4, 5, 8))
    got = MAVLLoss(ce=1.0, cl_global=0.1)(model, out, labels, index)
    ce, cl, glob = _reference_losses(model, out, labels, index, 0.1)
    torch.testing.assert_close(got["ce"], ce.detach())
    torch.testing.assert_close(got["cl"], cl.detach())
    torch.testing.assert_close(got["global"], glob.detach())
    torch.testing.assert_close(got["loss"].detach(), (ce + cl + glob).detach())
    assert got["loss"].requires_grad and math.isfinite(float(got["loss"].detach()))
    # no present entity: the location term is 0, not NaN
    none = MAVLLoss()(model, out, labels.clamp(max=0), index)
    assert float(none["cl"]) == 0.0 and math.isfinite(float(none["loss"].detach()))


def test_attention_maps_cover_the_patch_grid():
    model = _ours().eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["grid"] == 4 and len(out["attn"]) == 2
    a = out["attn"][-1]
    assert a.shape == (2, len(ENTS) * K, 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, len(ENTS) * K))
    p = model.presence(torch.randn(2, 3, 64, 64))
    assert p.shape == (2, len(ENTS)) and ((p > 0) & (p < 1)).all()


def test_vit_config_on_meta_has_biomedclip_shapes():
    """``mavl_pretrain/mimic_vit_biomedclip``'s model section built on ``meta`` (books aside):
    BiomedCLIP's ViT-B/16 tower, 14 x 14 patch tokens x 768 projected to 256, CLS through
    Linear(768, 256); the decoder and heads as the ResNet model's."""
    from pathlib import Path

    from omegaconf import OmegaConf

    w = 768  # ViT-B/16: patch conv, CLS, 197 positions, 12 blocks, final norm; then 768 -> 512
    block = 2 * w + w * 3 * w + 3 * w + w * w + w + 2 * w + w * 4 * w + 4 * w + 4 * w * w + w
    vit_b16_trunk = 3 * 16 * 16 * w + w + w + 197 * w + 12 * block + 2 * w
    assert vit_b16_trunk + 768 * 512 == 86_191_872  # BiomedCLIP's visual tower

    path = (
        Path(__file__).resolve().parents[2]
        / "recipes/configs/mavl_pretrain/mimic_vit_biomedclip.yaml"
    )
    sizes = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]
    for k in ("_component_", "text_model_dir", "disease_book", "concept_book"):
        sizes.pop(k)
    sizes["vision"]["path"] = None  # the published config, random weights on meta
    with torch.device("meta"):
        model = build_mavl(**sizes)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    img = model.image
    assert img.grid == 14 and img.image_size == 224 and img.tower.kind == "open_clip_timm"
    assert n(img.tower) == 86_191_872 and n(img.tower.tower.trunk) == vit_b16_trunk
    assert n(img.global_proj) == 768 * 256 + 256
    assert n(img.proj1) + n(img.proj2) == 768 * 768 + 768 + 1 + 768 * 256 + 256
    # the tower's 768 -> 512 projection is not used (patch tokens + CLS) and is frozen
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"image.tower.tower.head.proj.weight"}
    attn = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256
    layer = 2 * attn + (256 * 1024 + 1024) + (1024 * 256 + 256) + 3 * 512
    assert n(model.decoder) == 4 * layer + 512 and n(model.location_emb) == 256 * 768 * 9 + 768
    assert img.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    with pytest.raises(KeyMapError, match="ResNet-50"):
        convert_mavl_state(_RefMAVL().state_dict(), model)


def test_vit_backbone_trains_and_round_trips(tiny_towers, tmp_path):
    """A tiny open_clip ViT from the test assets (weights from its hub folder): forward shapes, CLS
    and patch tokens as the tower computes them, every used parameter gets a gradient from the
    MAVL loss, and a saved checkpoint reloads into a fresh model with the same outputs."""
    from medtune.eval.mavl_zero_shot import _transform
    from medtune.training.checkpointing import read_trained, save_trained

    spec = {"_component_": "medtune.models.encoders.open_clip_vision",
            "path": str(tiny_towers / "tiny_biomedclip")}  # fmt: skip
    torch.manual_seed(0)
    model = build_mavl(backbone="vit", vision=spec, entities=ENTS, n_concepts=K, text_width=T,
                       d_model=D, heads=HEADS, num_layers=1, dim_feedforward=32)  # fmt: skip
    model.set_books(torch.randn(52, T), torch.randn(len(ENTS) * K, T))
    tower = model.image.tower.tower
    x = torch.randn(3, 3, 32, 32)
    pooled, tokens = tower(x)  # open_clip: (projected CLS, patch tokens after ln_post)
    cls, patches = model.image.tokens(x)
    torch.testing.assert_close(patches, tokens)
    torch.testing.assert_close(cls @ tower.proj, pooled)
    out = model(x)
    assert out["grid"] == 4 and out["logits"].shape == (3, len(ENTS), 2)
    assert out["attn"][0].shape == (3, len(ENTS) * K, 16)
    labels = torch.tensor([[1, 0, -1, 2, 1], [0, 1, 1, -1, 0], [1, 1, 0, 0, -1]])
    res = MAVLLoss(ce=1.0, cl_global=0.1)(model, out, labels, torch.randint(0, 52, (3, 5, 8)))
    res["loss"].backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [] and not tower.proj.requires_grad
    save_trained(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        tmp_path / "ck",
        "x: 1\n",
    )
    torch.manual_seed(1)
    again = build_mavl(backbone="vit", vision=spec, entities=ENTS, n_concepts=K, text_width=T,
                       d_model=D, heads=HEADS, num_layers=1, dim_feedforward=32)  # fmt: skip
    again.set_books(model.anatomy_book, model.concept_book)
    again.load_state_dict(read_trained(tmp_path / "ck", "checkpoint"))
    model.eval(), again.eval()
    torch.testing.assert_close(again(x)["logits"], model(x)["logits"], rtol=0, atol=0)
    # zero-shot feeds it the tower's own input: its size and (CLIP) mean / std
    size, tf = _transform(model)
    assert size == 32 and tf["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    with pytest.raises(ValueError, match="backbone vit needs a ViT tower"):
        build_mavl(backbone="vit")


def test_text_mode_scores_as_mavl_test_py():
    """``presence(mode="text")`` = MAVL test.py's ``mode: text`` written out: the global logits
    as ``[B, K, E]``, a softmax of (normal, entity) per concept for normal_idx 0 and 1, averaged,
    then the present column averaged over the K concepts."""
    torch.manual_seed(0)
    ents = ["normal", "clear", *ENTS]
    model = build_mavl(entities=ents, n_concepts=K, text_width=T, block="basic", blocks=[1, 1, 1], width=8,
                       image_size=64, pool_heads=2, d_model=D, heads=HEADS, num_layers=1,
                       dim_feedforward=32).eval()  # fmt: skip
    model.set_books(torch.randn(52, T), torch.randn(len(ents) * K, T))
    x = torch.randn(2, 3, 64, 64)
    pred_global = model(x)["global_logits"].view(2, len(ents), K).permute(0, 2, 1)  # B, K, E
    preds = []
    for normal_idx in [0, 1]:
        normal = pred_global[:, :, [normal_idx]].repeat(1, 1, len(ents))
        preds.append(F.softmax(torch.stack([normal, pred_global], dim=-1), dim=-1))
    want = torch.stack(preds, dim=0).mean(dim=0)[:, :, :, 1].mean(dim=1)
    torch.testing.assert_close(model.presence(x, "text"), want)
    assert not torch.allclose(model.presence(x, "text"), model.presence(x))
    with pytest.raises(ValueError, match="feature or text"):
        model.presence(x, "both")
