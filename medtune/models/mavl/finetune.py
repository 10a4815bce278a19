"""MAVL fine-tuning models on the pretrained ResNet trunk: a classifier and the ResUNet segmenter.

Followed: ``Finetuning/classification/models/mavl.py`` (``MAVL_ft``: the ResNet up to global
average pooling, a linear head; ``layer4`` is not pretrained by MAVL, it starts from ImageNet or
random) and ``Finetuning/segmentation/models/resunet_mavl.py`` (``ModelResUNet_MAVL_ft``: skips at
the stem ReLU, layer1 and layer2, a bridge of two conv-BN-ReLU blocks after layer3, four
transposed-conv up blocks, dropout 0.2, a 1x1 classifier) of HieuPhan33/CVPR2024_MAVL. Channel
widths follow the trunk so a tiny trunk gives a tiny decoder (ResNet-50: MAVL's 1024/512/256/128/64).
The trunk's weights come from a ``mavl_pretrain`` checkpoint folder or a released MAVL ``.pth``
(:func:`load_pretrained_trunk`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medtune.models.mavl.backbone import _BLOCKS, ResNetTrunk


def load_pretrained_trunk(trunk: ResNetTrunk, path: str | Path) -> None:
    """MAVL's pretrained trunk into ``trunk``: ``path`` is a ``mavl_pretrain`` folder
    (``model.safetensors``, keys ``image.trunk.*``) or a released MAVL ``.pth`` (``backbone.0..6``)."""
    from medtune.models.convert import apply_key_map, read_foreign_checkpoint, strip_prefix
    from medtune.models.convert.mavl import rename

    p = Path(path)
    if p.is_dir():
        sd = read_foreign_checkpoint(p / "model.safetensors")
        prefix, source = "image.trunk.", f"mavl_pretrain checkpoint {p}"
    else:
        sd = {rename(k) or k: v for k, v in strip_prefix(read_foreign_checkpoint(p)).items()}
        prefix, source = "image.trunk.", f"MAVL {p}"
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    target = {k: v.shape for k, v in trunk.state_dict().items()}
    trunk.load_state_dict(apply_key_map(sd, lambda k: k, target, source=source))


class MAVLClassifier(nn.Module):
    """ResNet (trunk + layer4) -> global average pool -> linear. ``[B, 3, H, W]`` -> logits ``[B, C]``."""

    def __init__(
        self, trunk: ResNetTrunk, num_classes: int, block: str = "bottleneck", layer4: int = 3
    ) -> None:
        super().__init__()
        self.trunk = trunk
        width = trunk.conv1.out_channels
        # trunk.inplanes is layer3's output; _make_layer continues from it (torchvision's layer4)
        self.layer4 = trunk._make_layer(_BLOCKS[block], width * 8, layer4, stride=2)
        self.out = nn.Linear(trunk.inplanes, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.trunk(images))
        return self.out(x.mean((2, 3)))


class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, up_in: int, up_out: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(up_in, up_out, kernel_size=2, stride=2)
        self.conv_block_1, self.conv_block_2 = _ConvBlock(cin, cout), _ConvBlock(cout, cout)

    def forward(self, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return self.conv_block_2(self.conv_block_1(torch.cat([self.upsample(up), down], 1)))


class MAVLResUNet(nn.Module):
    """ResUNet on the trunk. ``[B, 3, H, W]`` (H, W divisible by 16) -> mask logits ``[B, out, H, W]``."""

    def __init__(self, trunk: ResNetTrunk, out_channels: int = 1) -> None:
        super().__init__()
        self.trunk = trunk
        stem = trunk.conv1.out_channels
        c3 = trunk.out_channels
        c1, c2 = c3 // 4, c3 // 2  # layer1, layer2 outputs
        self.bridge = nn.Sequential(_ConvBlock(c3, c3), _ConvBlock(c3, c3))
        self.up_blocks = nn.ModuleList([
            _UpBlock(c2 + c2, c2, c3, c2), _UpBlock(c1 + c1, c1, c2, c1),
            _UpBlock(2 * stem + stem, 2 * stem, c1, 2 * stem), _UpBlock(stem + 3, stem, 2 * stem, stem),
        ])  # fmt: skip
        self.dropout = nn.Dropout(0.2)
        self.seg_classifier = nn.Conv2d(stem, out_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        s0 = t.relu(t.bn1(t.conv1(images)))
        s1 = t.layer1(t.maxpool(s0))
        s2 = t.layer2(s1)
        o = self.bridge(t.layer3(s2))
        for up, down in zip(self.up_blocks, (s2, s1, s0, images)):
            o = up(o, down)
        return self.seg_classifier(self.dropout(o))


def mavl_classifier(num_classes: int, *, pretrained: str | None = None, block: str = "bottleneck",
                    blocks=(3, 4, 6, 3), width: int = 64) -> MAVLClassifier:  # fmt: skip
    """MAVL's fine-tuning classifier (``blocks``: layer1..layer4; ``pretrained``: see
    :func:`load_pretrained_trunk`; layer4 and the head start random as no MAVL weights exist for them)."""
    trunk = ResNetTrunk(block, tuple(blocks[:3]), width)
    if pretrained:
        load_pretrained_trunk(trunk, pretrained)
    return MAVLClassifier(trunk, num_classes, block, blocks[3])


def mavl_resunet(out_channels: int = 1, *, pretrained: str | None = None, block: str = "bottleneck",
                 blocks=(3, 4, 6), width: int = 64) -> MAVLResUNet:  # fmt: skip
    """MAVL's ResUNet segmenter on the (pretrained) trunk."""
    trunk = ResNetTrunk(block, tuple(blocks), width)
    if pretrained:
        load_pretrained_trunk(trunk, pretrained)
    return MAVLResUNet(trunk, out_channels)
