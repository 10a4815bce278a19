"""MAVL fine-tuning models: full size on ``meta`` (MAVL_ft = torchvision ResNet-50 without fc +
a linear head; ResUNet with MAVL's channel plan), and the pretrained trunk loading from a
``mavl_pretrain`` folder and from a released MAVL ``.pth``."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from medtune.models.mavl import build_mavl
from medtune.models.mavl.finetune import mavl_classifier, mavl_resunet
from medtune.training.checkpointing import save_trained

TINY = dict(block="basic", width=4)


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_full_size_on_meta():
    with torch.device("meta"):
        clf, seg, r50 = mavl_classifier(2), mavl_resunet(1), torchvision.models.resnet50()
    assert _n(clf) == _n(r50) - _n(r50.fc) + 2048 * 2 + 2
    conv = lambda i, o, k=3: i * o * k * k + o + 2 * o  # noqa: E731 - conv + BN (MAVL's ConvBlock)
    up = lambda ui, uo, i, o: ui * uo * 4 + uo + conv(i, o) + conv(o, o)  # noqa: E731
    want = (_n(clf.trunk) + 2 * conv(1024, 1024) + up(1024, 512, 1024, 512) + up(512, 256, 512, 256)
            + up(256, 128, 192, 128) + up(128, 64, 67, 64) + 64 + 1)  # fmt: skip
    assert _n(seg) == want  # resunet_mavl.py: d = 1024 / 512 / 256 / 128 / 64


def test_pretrained_trunk_from_pretrain_folder_and_released_pth(tmp_path):
    torch.manual_seed(0)
    pre = build_mavl(entities=["a", "b"], n_concepts=2, text_width=8, blocks=[1, 1, 1], image_size=32,
                     pool_heads=2, d_model=8, heads=2, num_layers=1, dim_feedforward=16, **TINY)  # fmt: skip
    sd = {k: v.contiguous() for k, v in pre.state_dict().items()}
    save_trained(sd, tmp_path / "epoch_0", "x: 1\n")
    trunk = {k[len("image.trunk.") :]: v for k, v in sd.items() if k.startswith("image.trunk.")}
    clf = mavl_classifier(3, pretrained=str(tmp_path / "epoch_0"), blocks=[1, 1, 1, 1], **TINY)
    for k, v in clf.trunk.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    # a released MAVL .pth: module. prefixes, backbone.<i> names
    back = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    released = {
        f"module.backbone.{back[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in trunk.items()
    }
    released["module.classifier.weight"] = torch.zeros(2, 16)  # the rest of MAVL is not used here
    torch.save({"model": released}, tmp_path / "checkpoint_full_46.pth")
    seg = mavl_resunet(
        1, pretrained=str(tmp_path / "checkpoint_full_46.pth"), blocks=[1, 1, 1], **TINY
    )
    for k, v in seg.trunk.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    assert seg(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)
