"""MAVL's image side: a ResNet cut after ``layer3`` with attention pooling for the global feature,
and 1x1 conv projections of the patch grid to ``d_model``.

Followed: ``Pretrain/models/model_MAVL.py`` of HieuPhan33/CVPR2024_MAVL (``AttentionPool2d``,
``MAVL._get_basemodel``: ``nn.Sequential(*list(resnet.children())[:-3])`` i.e. conv1 ... layer3,
``res_l1`` = 1x1 conv + PReLU, ``res_l2`` = 1x1 conv to ``d_model``, ``image_encoder``). The trunk
keeps torchvision's module names (``conv1``, ``bn1``, ``layer1``..``layer3``) so torchvision's
ImageNet ResNet weights load into it; its base width and block counts are arguments so tests can
build a tiny one of the same structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet up to ``layer3`` (stride 16).

    Args:
        block: ``bottleneck`` (ResNet-50) or ``basic`` (ResNet-18).
        layers: blocks in layer1..layer3 (ResNet-50: ``[3, 4, 6]``).
        width: channels of the stem (64 in torchvision; small in tests).

    Shape: ``[B, 3, H, W]`` -> ``[B, 4 * width * expansion, H / 16, W / 16]`` (ResNet-50 at 224 px:
    ``[B, 1024, 14, 14]``).
    """

    def __init__(self, block: str = "bottleneck", layers=(3, 4, 6), width: int = 64) -> None:
        super().__init__()
        blk = _BLOCKS[block]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(blk, width, layers[0])
        self.layer2 = self._make_layer(blk, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(blk, width * 4, layers[2], stride=2)
        self.out_channels = width * 4 * blk.expansion

    def _make_layer(self, blk, planes: int, n: int, stride: int = 1) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * blk.expansion:
            down = nn.Sequential(
                conv1x1(self.inplanes, planes * blk.expansion, stride),
                nn.BatchNorm2d(planes * blk.expansion),
            )
        mods = [blk(self.inplanes, planes, stride, down)]
        self.inplanes = planes * blk.expansion
        mods += [blk(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (query = mean of the grid, learned positions), as MAVL uses it.

    Args:
        spatial: grid side (14 for 224 px at stride 16).
        dim: input channels.
        heads: attention heads (MAVL: 8).
        out_dim: output width (``d_model``).

    Shape: ``[B, dim, s, s]`` -> ``[B, out_dim]``.
    """

    def __init__(self, spatial: int, dim: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False,
        )  # fmt: skip
        # MAVL attends with all HW+1 queries and keeps row 0; the other rows do not feed row 0,
        # so attending with the first query only gives the same output for a fraction of the work.
        return x[0]


class MAVLImageEncoder(nn.Module):
    """ResNet trunk -> (patch features ``[B, d_model, s, s]``, global feature ``[B, d_model]``).

    Args:
        trunk: a :class:`ResNetTrunk`.
        d_model: width of the query decoder.
        image_size: input side (the pooling's learned positions fix the grid: ``image_size / 16``).
        pool_heads: attention-pool heads (MAVL: 8).
    """

    def __init__(
        self, trunk: ResNetTrunk, d_model: int, image_size: int = 224, pool_heads: int = 8
    ) -> None:
        super().__init__()
        c = trunk.out_channels
        self.trunk = trunk
        self.grid = image_size // 16
        # the input zero-shot and grounding feed it (MAVL's test datasets: ImageNet mean / std)
        self.image_size, self.mean, self.std = (
            image_size,
            [0.485, 0.456, 0.406],
            [0.229, 0.224, 0.225],
        )
        self.pool = AttentionPool2d(self.grid, c, pool_heads, d_model)
        self.proj1 = nn.Sequential(nn.Conv2d(c, c, kernel_size=1), nn.PReLU())
        self.proj2 = nn.Conv2d(c, d_model, kernel_size=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(images)
        return self.proj2(self.proj1(feats)), self.pool(feats)
