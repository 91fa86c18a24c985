"""Wide residual networks (Zagoruyko & Komodakis 2016), the variant used by TRADES, MART and most
adversarial-training work: WRN-d-k with n = (d - 4) / 6 pre-activation basic blocks per group, groups of
16k, 32k, 64k channels after a 16-channel 3x3 ``conv1``, strides 1/2/2, final BN-act, global average
pooling and a linear layer; optional dropout between the two convolutions of each block.

In a block whose shape changes, the 1x1 projection shortcut takes the pre-activated input BN-act(x); in
an identity block the shortcut is x itself. Weights: conv ~ N(0, 2/(k*k*out_channels)), BN weight 1 and
bias 0, linear bias 0 (the WRN authors' initialisation). The TRADES code also builds an unused
``sub_block1``; it is left out here (it never enters the forward pass and would make DDP complain), so
WRN-34-10 has 46,160,474 parameters for 10 classes and WRN-28-10 36,479,194.
For ``image_size >= 64`` the first group (``block1``) has stride 2, as the ResNets' first stage (see resnet.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.models.base import NormalizedModel
from fastrobust.models.resnet import first_stage_stride

ActFactory = Callable[[], nn.Module]


class WideBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float, act: ActFactory):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = act()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = act()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.act2(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))

    def extra_repr(self) -> str:
        return f"dropout={self.dropout:g}" if self.dropout else ""


class WideResNet(NormalizedModel):
    """WRN-depth-widen_factor; names ``conv1``, ``block1``/``block2``/``block3`` (nn.Sequential of blocks),
    ``bn1``, ``act``, ``fc``."""

    def __init__(
        self, *, depth: int, widen_factor: int, dropout: float, num_classes: int, in_channels: int,
        act: ActFactory, image_size: int, mean=None, std=None,
    ):
        super().__init__(in_channels, mean, std)
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        strides = (first_stage_stride(image_size), 2, 2)
        for index in range(3):
            blocks = [
                WideBasicBlock(widths[index] if i == 0 else widths[index + 1], widths[index + 1],
                               strides[index] if i == 0 else 1, dropout, act)
                for i in range(n)
            ]
            self.add_module(f"block{index + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.act(self.bn1(out))
        return self.fc(torch.flatten(self.pool(out), 1))
